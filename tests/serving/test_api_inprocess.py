"""The OpenAI-compatible app in process (FastAPI's TestClient) on the bundled stories260K model with the vicuna_v1.1
template: answers are transformers' greedy continuation of FastChat's rendering of the conversation, usage counts
are those prompts' lengths, and every bad request gets OpenAI's error JSON with a 4xx status (never 500)."""
import json

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from fastchat.conversation import get_conv_template

from mindformers_sft.data.templates import get_template
from mindformers_sft.generation.engine import Engine
from mindformers_sft.pretrained import from_hf_dir
from mindformers_sft.serving.app import create_app
from mindformers_sft.tokenizer import load_tokenizer
from tests.paths import STORIES

NAME = "stories260K"
CHAT = [{"role": "system", "content": "You are a storyteller."}, {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time there was a cat."}, {"role": "user", "content": "And then?"}]


@pytest.fixture(scope="module")
def client():
    model = from_hf_dir(STORIES)
    model.set_train(False)
    tok = load_tokenizer(STORIES)
    app = create_app(Engine(model, model.config.eos_token_ids, 8, 512), tok, get_template("vicuna_v1.1", tok), NAME)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """(prompt ids, greedy new ids, text) from FastChat's vicuna_v1.1 prompt, the HF tokenizer and HF generate."""
    conv = get_conv_template("vicuna_v1.1")
    conv.set_system_message(CHAT[0]["content"])
    for m in CHAT[1:]:
        conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    conv.append_message(conv.roles[1], None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    ids = hf_tok(conv.get_prompt())["input_ids"]
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, pad_token_id=0)[0].tolist()
    new = new[len(ids):]
    return ids, new, hf_tok.decode(new, skip_special_tokens=True)


def _post(client, path, body, raw=False):
    return client.post(path, content=body if raw else json.dumps(body), headers={"content-type": "application/json"})


def test_chat_answer_usage_and_stream_match_transformers(client, reference):
    ids, new, text = reference
    r = _post(client, "/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == NAME
    assert j["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert j["choices"][0]["finish_reason"] == ("stop" if 2 in new else "length")
    assert j["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
    over = 512 - len(ids) + 1      # one token too many: refused with both sizes
    r = _post(client, "/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": over})
    assert r.status_code == 400 and f"requested 513 tokens ({len(ids)} in the messages, {over} in the completion)" \
        in r.json()["error"]["message"]

    r = _post(client, "/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 20, "temperature": 0,
                                               "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert chunks[-2]["choices"][0]["finish_reason"] == j["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == j["usage"]


def test_completions_stop_strings_and_models(client):
    hf_tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    prompt = "Once upon a time"
    r = _post(client, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 30, "temperature": 0})
    full = r.json()["choices"][0]["text"]
    assert r.json()["usage"]["prompt_tokens"] == len(hf_tok(prompt)["input_ids"])
    stop = full.split()[3]           # a word of the answer: the text ends right before its first occurrence
    r = _post(client, "/v1/completions", {"model": NAME, "prompt": [prompt, "Lily"], "max_tokens": 30,
                                          "temperature": 0, "stop": [stop, "zzz"]})
    first = r.json()["choices"][0]
    assert first["text"] == full[:full.index(stop)] and first["finish_reason"] == "stop"
    assert len(r.json()["choices"]) == 2
    # seeded sampling repeats itself; other seeds give other samples (top_k / top_p accepted)
    sampled = [_post(client, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 20, "temperature": 1.2,
                                                 "top_p": 0.95, "top_k": 40, "seed": s}).json()["choices"][0]["text"]
               for s in (5, 5, 6, 7)]
    assert sampled[0] == sampled[1] and len(set(sampled[1:])) > 1 and full not in sampled
    assert client.get("/v1/models").json()["data"][0]["id"] == NAME
    # a JSON body sent as form data (curl -d without a content type) is read as JSON
    r = client.post("/v1/completions", content=json.dumps({"model": NAME, "prompt": prompt, "max_tokens": 30,
                                                            "temperature": 0}),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.json()["choices"][0]["text"] == full
    assert client.get(f"/v1/models/{NAME}").json()["max_model_len"] == 512
    assert "<html" in client.get("/").text.lower()


BAD = [  # (body, status, param or None, words in the message)
    ('{"model": "stories260K", "messages": [', 400, None, "not valid JSON"),
    ('[1, 2]', 400, None, "valid dictionary"),
    ({"model": "gpt-4", "messages": CHAT}, 404, "model", "does not exist"),
    ({"messages": CHAT}, 400, "model", "required"),
    ({"model": NAME}, 400, "messages", "required"),
    ({"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.[0].role", "unknown role"),
    ({"model": NAME, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages.[0].role", "expected 'user'"),
    ({"model": NAME, "messages": CHAT[:3]}, 400, "messages", "last message must be a user"),
    ({"model": NAME, "messages": [CHAT[1], CHAT[0]]}, 400, "messages.[1].role", "expected 'assistant'"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.[0].content",
     "only text"),
    ({"model": NAME, "messages": [{"role": "user", "content": "story " * 300}]}, 400, "messages",
     "maximum context length is 512 tokens"),
    ({"model": NAME, "messages": CHAT, "max_tokens": 500}, 400, "messages", "500 in the completion"),
    ({"model": NAME, "messages": CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": NAME, "messages": CHAT, "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": NAME, "messages": CHAT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": NAME, "messages": CHAT, "top_k": -2}, 400, "top_k", "greater than or equal to -1"),
    ({"model": NAME, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": NAME, "messages": CHAT, "n": 2}, 400, "n", "less than or equal to 1"),
    ({"model": NAME, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": NAME, "messages": CHAT, "seed": "x"}, 400, "seed", "valid integer"),
    ({"model": NAME, "messages": CHAT, "logprobs": True}, 400, "logprobs", "not supported"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[b[3] for b in BAD])
def test_bad_chat_requests_get_openai_errors(client, body, status, param, words):
    r = _post(client, "/v1/chat/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err


def test_other_bad_requests(client):
    cases = [("/v1/completions", {"model": NAME, "prompt": [[1, 2], [3, 100000]]}, 400, "prompt"),
             ("/v1/completions", {"model": NAME, "prompt": ["a", "b"], "stream": True}, 400, "prompt"),
             ("/v1/completions", {"model": NAME, "prompt": "a", "echo": True}, 400, "echo"),
             ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
             ("/v1/nothing", {}, 404, None)]
    for path, body, status, param in cases:
        r = _post(client, path, body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/v1/models/nope").status_code == 404


def test_api_key_is_required_when_set():
    from mindformers_sft.serving.app import BearerAuth
    from fastapi import FastAPI
    app = FastAPI()
    app.get("/")(lambda: {"page": True})
    app.get("/v1/models")(lambda: {"ok": True})
    app.add_middleware(BearerAuth, key="sk-abc")
    c = TestClient(app)
    assert c.get("/").status_code == 200                 # the page itself (it asks for the key)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-abc"}):
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": "Bearer sk-abc"}).json() == {"ok": True}
