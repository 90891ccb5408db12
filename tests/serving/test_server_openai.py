"""The real server (conftest.server: a LoRA checkpoint behind `run_mindformer.py --run_mode serve`) driven by the
official `openai` client: models, chat (streamed and not), completions, 8 concurrent clients whose greedy answers
equal the single-request ones, errors as openai exceptions, the API key, and a client that leaves mid-stream."""
import threading

import httpx
import openai
import pytest

from mindformers_sft.config import load_config
from mindformers_sft.data.templates import get_template
from mindformers_sft.generation import generate
from mindformers_sft.generation.chat import prompt_ids
from mindformers_sft.run import build_model, tokenizer_path
from mindformers_sft.tokenizer import load_tokenizer
from tests.serving.conftest import API_KEY, CONFIG

QUESTIONS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about rain.",
             "Name a fruit.", "Explain photosynthesis briefly.", "Tell me a joke.", "How do birds fly?",
             "Describe the sea."]


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client, name, text, **kw):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                          max_tokens=kw.pop("max_tokens", 16), temperature=0, **kw)


def test_models_chat_and_stream_equal_our_generate(client, server):
    _, name, ckpt = server
    assert [m.id for m in client.models.list().data] == [name]
    # the reference: the same LoRA checkpoint loaded in this process, the template its training run recorded
    # (alpaca), generate() one prompt at a time
    cfg = load_config(CONFIG, [f"load_checkpoint={ckpt}"])
    cfg.context.device_target = "CPU"
    model = build_model(cfg, log=lambda *a: None)
    model.set_train(False)
    tok = load_tokenizer(tokenizer_path(cfg))
    ids = prompt_ids(get_template("alpaca", tok), tok, [("user", QUESTIONS[0])])
    new = generate(model, [ids], 16, eos_token_id=model.config.eos_token_ids)[0][len(ids):]
    expected = tok.decode(new, skip_special_tokens=True)

    r = _chat(client, name, QUESTIONS[0])
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))
    stream = _chat(client, name, QUESTIONS[0], stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected and finish == r.choices[0].finish_reason
    assert len([p for p in pieces if p]) > 1      # streamed piece by piece

    c = client.completions.create(model=name, prompt="Once upon a time", max_tokens=16, temperature=0)
    ref = generate(model, [tok.encode("Once upon a time", add_special_tokens=True)], 16,
                   eos_token_id=model.config.eos_token_ids)[0]
    assert c.choices[0].text == tok.decode(ref[c.usage.prompt_tokens:], skip_special_tokens=True)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=name, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True))
    assert streamed == c.choices[0].text


def test_eight_concurrent_clients_get_the_single_request_answers(client, server):
    _, name, _ = server
    single = [_chat(client, name, q).choices[0].message.content for q in QUESTIONS]
    results = [None] * len(QUESTIONS)

    def ask(i):
        c = openai.OpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0, timeout=300)
        if i % 2:
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in _chat(c, name, QUESTIONS[i], stream=True)
                                 if ch.choices)
        else:
            results[i] = _chat(c, name, QUESTIONS[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == single


def test_errors_api_key_and_disconnect(client, server):
    url, name, _ = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(client, "gpt-4o", "hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        _chat(client, name, "word " * 400)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models").status_code == 401

    # a client that goes away (mid-stream, or while waiting for a whole answer) frees its slot; the server goes on
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def health():
        return httpx.get(url + "/health", headers=auth).json()

    def settled(before):
        for _ in range(100):
            h = health()
            if h["running"] == 0 and h["cancelled"] == before + 1:
                return h
            threading.Event().wait(0.1)
        return h

    body = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}

    def busy():
        """7 other clients with long answers: the engine steps a full batch while the 8th client goes away (a
        decode step of the tiny model alone is too fast for a disconnect to land mid-answer)."""
        ts = [threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",),
                               kwargs=dict(json={**body, "stream": False}, headers=auth, timeout=300))
              for _ in range(7)]
        for t in ts:
            t.start()
        for _ in range(300):
            if health()["running"] >= 7:
                break
            threading.Event().wait(0.01)
        return ts

    before = health()["cancelled"]
    others = busy()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert health()["running"] == 8
    for t in others:
        t.join()
    h = settled(before)
    assert (h["running"], h["waiting"], h["cancelled"]) == (0, 0, before + 1)
    others = busy()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, headers=auth, timeout=0.05)
    for t in others:
        t.join()
    h = settled(before + 1)
    assert (h["running"], h["waiting"], h["cancelled"]) == (0, 0, before + 2)
    assert _chat(client, name, QUESTIONS[1]).choices[0].message.content
