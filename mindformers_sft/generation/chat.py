"""Prompts in the template a model was fine-tuned with, and a multi-turn chat on stdin/stdout.

`prompt_ids` renders a conversation (user first, alternating) with the template and a generation prompt, so the
model continues as the assistant, exactly as the training rows were rendered. `chat` keeps the history: every
user line and every reply become turns of the next prompt.

    python run_mindformer.py --config ... --run_mode chat --load_checkpoint OUTPUT/checkpoint [--chat_template ...]
    > user line          (/reset forgets the history, /exit or end of input stops)
"""
from __future__ import annotations

import json

from ..data.formats import Conversation

RESET, EXIT = "/reset", ("/exit", "/quit")


def prompt_ids(template, tok, turns, system=None) -> list:
    """Token ids of `turns` [(role, text), ...] ending with a user turn, rendered for the assistant to answer;
    without a template, the last user text as it is (with the tokenizer's bos)."""
    if template is None:
        return tok.encode(turns[-1][1], add_special_tokens=True)
    rendered = template.render(Conversation(turns=list(turns), system=system), add_generation_prompt=True)
    return ([tok.bos_token_id] if template.prepend_bos(rendered) else []) + tok.encode(rendered)


def reply(model, tok, ids, gen: dict, eos, seed) -> tuple:
    """(text, all token ids) of the model's continuation of `ids`, stopping at eos."""
    from .generate import generate
    out = generate(model, [ids], eos_token_id=eos, seed=seed, **gen)[0]
    return tok.decode(out[len(ids):], skip_special_tokens=True).strip(), out


def chat(model, tok, template, gen: dict, eos, seed, lines, write, max_context: int) -> int:
    """Answer each line of `lines` with the history so far; `write(json_line)` gets one object per reply.
    A history longer than `max_context` tokens loses its oldest exchanges. Returns the number of replies."""
    turns, n = [], 0
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in EXIT:
            break
        if text.strip() == RESET:
            turns = []
            write(json.dumps({"reset": True}))
            continue
        turns.append(("user", text))
        ids = prompt_ids(template, tok, turns)
        while len(ids) + gen["max_new_tokens"] > max_context and len(turns) > 1:
            turns = turns[2:]                       # forget the oldest user/assistant exchange
            ids = prompt_ids(template, tok, turns)
        if len(ids) + gen["max_new_tokens"] > max_context:
            turns = []
            write(json.dumps({"user": text, "error": f"this message takes {len(ids)} tokens; with max_new_tokens "
                              f"{gen['max_new_tokens']} it exceeds the context of {max_context} (seq_length): "
                              "send a shorter one"}, ensure_ascii=False))
            continue
        answer, _ = reply(model, tok, ids, gen, eos, seed)
        turns.append(("assistant", answer))
        n += 1
        write(json.dumps({"turn": n, "user": text, "assistant": answer, "prompt_tokens": len(ids)},
                         ensure_ascii=False))
    return n
