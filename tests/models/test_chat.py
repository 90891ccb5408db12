"""Multi-turn chat: every prompt is the whole history rendered as FastChat renders it (FastChat's conversation
+ the Hugging Face tokenizer as the reference), each reply is the model's greedy continuation of that prompt,
/reset forgets the history and an over-long history loses its oldest exchanges."""
import json
import os
import subprocess
import sys

from fastchat.conversation import get_conv_template
from transformers import AutoTokenizer

from mindformers_sft.data.templates import get_template
from mindformers_sft.generation import generate
from mindformers_sft.generation.chat import chat, prompt_ids
from mindformers_sft.pretrained import from_hf_dir
from mindformers_sft.tokenizer import load_tokenizer
from tests.paths import ROOT, STORIES

GEN = dict(max_new_tokens=12, do_sample=False, temperature=1.0, top_k=0, top_p=1.0)


def _fastchat_ids(hf_tok, history, user):
    conv = get_conv_template("vicuna_v1.1")
    for u, a in history:
        conv.append_message(conv.roles[0], u)
        conv.append_message(conv.roles[1], a)
    conv.append_message(conv.roles[0], user)
    conv.append_message(conv.roles[1], None)
    return hf_tok(conv.get_prompt())["input_ids"]


def test_chat_history_matches_fastchat_and_replies_are_greedy_continuations():
    model = from_hf_dir(STORIES)
    model.set_train(False)
    tok = load_tokenizer(STORIES)
    hf_tok = AutoTokenizer.from_pretrained(STORIES)
    template = get_template("vicuna_v1.1", tok)
    eos = model.config.eos_token_ids
    lines = ["Tell me a story about a cat.", "What happened next?", "/reset", "Hi there."]
    out = []
    assert chat(model, tok, template, GEN, eos, 0, lines, out.append, max_context=4096) == 3
    rows = [json.loads(r) for r in out]
    assert rows[2] == {"reset": True}
    t1, t2, t3 = rows[0], rows[1], rows[3]
    ids1 = _fastchat_ids(hf_tok, [], lines[0])
    ids2 = _fastchat_ids(hf_tok, [(lines[0], t1["assistant"])], lines[1])
    ids3 = _fastchat_ids(hf_tok, [], lines[3])
    assert prompt_ids(template, tok, [("user", lines[0])]) == ids1
    assert prompt_ids(template, tok, [("user", lines[0]), ("assistant", t1["assistant"]),
                                      ("user", lines[1])]) == ids2
    assert (t1["prompt_tokens"], t2["prompt_tokens"], t3["prompt_tokens"]) == (len(ids1), len(ids2), len(ids3))
    for ids, row in ((ids1, t1), (ids2, t2), (ids3, t3)):
        full = generate(model, [ids], eos_token_id=eos, **{k: v for k, v in GEN.items()})[0]
        assert row["assistant"] == tok.decode(full[len(ids):], skip_special_tokens=True).strip()
        assert row["assistant"]

    # a history that no longer fits loses its oldest exchange
    out = []
    budget = len(ids2) + GEN["max_new_tokens"] - 1
    chat(model, tok, template, GEN, eos, 0, lines[:2], out.append, max_context=budget)
    second = json.loads(out[1])
    assert second["prompt_tokens"] == len(_fastchat_ids(hf_tok, [], lines[1]))
    # a single message that cannot fit is refused (not truncated), and the chat goes on
    out = []
    assert chat(model, tok, template, GEN, eos, 0, ["word " * 200, "Hi there."], out.append, max_context=150) == 1
    err, ok = json.loads(out[0]), json.loads(out[1])
    assert "exceeds the context of 150" in err["error"] and ok["turn"] == 1 and ok["prompt_tokens"] == len(ids3)


def test_chat_run_mode_reads_stdin():
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config",
                        os.path.join("configs", "stories260k", "lora_stories260k.yaml"), "--run_mode", "chat",
                        "--load_checkpoint", STORIES, "--max_new_tokens", "8", "--chat_template", "vicuna_v1.1"],
                       cwd=ROOT, input="Hello.\nAnd then?\n/exit\nnever read\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [row["turn"] for row in rows] == [1, 2] and rows[1]["user"] == "And then?"
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]
