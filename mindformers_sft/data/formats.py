"""Record formats (Alpaca, ShareGPT/FastChat, chat messages) normalized into one internal record.

Every raw record becomes a :class:`Conversation`: an optional system prompt and a list of
``(role, content)`` turns, roles ``"user"``/``"assistant"``, alternating, starting with ``"user"`` and
ending with ``"assistant"``. A record that cannot be made into one raises :class:`RecordError` (the
pipeline turns it into a reject with the file and line).

Formats
-------
``alpaca``    ``{"instruction", "input", "output"[, "system"][, "history": [[q, a], ...]]}``. The user turn is
              built with the Stanford Alpaca prompts (``alpaca_prompt="stanford"``, MindFormers'
              alpaca_converter / AlpacaInstructDataHandler) or as ``instruction + "\\n" + input``
              (``alpaca_prompt="plain"``, LLaMA-Factory / MindSpeed). History pairs are plain turns before it.
``sharegpt``  ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`` (FastChat). ``role``/``content``
              keys and the role names user/assistant/bot/chatgpt/model are accepted too. As FastChat's
              preprocess does, a leading assistant turn (before any user turn) is dropped (counted).
``messages``  ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}`` (OpenAI / HF chat).
              An assistant message (messages or sharegpt) may carry ``reasoning_content``, passed on to chat
              templates that render it (Qwen3: a ``<think>`` block); other templates refuse such a record.

``map_keys`` (a dict or a JSON string, MindSpeed-style) renames the columns. Alpaca keys: ``prompt``
(default ``instruction``), ``query`` (``input``), ``response`` (``output``), ``system`` (``system``),
``history`` (``history``). ShareGPT/messages keys: ``messages`` (``conversations`` / ``messages``),
``role_tag`` (``from`` / ``role``), ``content_tag`` (``value`` / ``content``), ``user_tag``,
``assistant_tag``, ``system_tag`` (extra role names accepted besides the defaults).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..errors import ConfigError

FORMATS = ("alpaca", "sharegpt", "messages")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPTS = ("stanford", "plain")

ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}
CHAT_KEYS = {"messages": None, "role_tag": None, "content_tag": None, "user_tag": None, "assistant_tag": None,
             "system_tag": None}
KNOWN_MAP_KEYS = tuple(ALPACA_KEYS) + tuple(CHAT_KEYS)

REASONING_KEY = "reasoning_content"   # an assistant message's reasoning, rendered by templates that read it (Qwen3)
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot", "chatgpt", "model"}
SYSTEM_ROLES = {"system"}


class RecordError(Exception):
    """One record cannot be used; the message is the reason written to the rejects file.

    ``warning=True``: a problem worth reporting that loses no record (e.g. a missing ',' in a JSON array)."""

    def __init__(self, message: str, warning: bool = False):
        super().__init__(message)
        self.warning = warning


@dataclass
class Location:
    """Where a record comes from: file, 0-based record index in the file, 1-based line (None: unknown)."""
    file: str
    index: int
    line: Optional[int] = None

    def __str__(self):
        if self.line is None:
            return f"{self.file}: record {self.index}"
        return f"{self.file}:{self.line} (record {self.index})"

    def as_dict(self):
        return {"file": self.file, "line": self.line, "index": self.index}


@dataclass
class Conversation:
    """The internal record: optional system prompt + alternating (role, content) turns, user first."""
    turns: List[Tuple[str, str]]
    system: Optional[str] = None
    dropped_leading: int = 0          # assistant turns dropped before the first user turn (FastChat does so)
    meta: dict = field(default_factory=dict)
    reasoning: dict = field(default_factory=dict)   # turn index -> reasoning_content of that assistant turn

    def messages(self) -> list:
        """HF / OpenAI-style message list (system first when set); ``reasoning_content`` on assistant turns that
        have it (Qwen3's and DeepSeek-R1's name, read by their chat templates)."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for j, (r, c) in enumerate(self.turns):
            m = {"role": r, "content": c}
            if j in self.reasoning:
                m["reasoning_content"] = self.reasoning[j]
            out.append(m)
        return out


def parse_map_keys(map_keys) -> dict:
    """map_keys as a dict (from a dict, a JSON string, None or ''). Unknown keys raise ConfigError."""
    if map_keys is None or map_keys == "" or map_keys == {}:
        return {}
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(f"map_keys: not valid JSON ({e.msg} at column {e.colno}): {map_keys!r}; expected e.g. "
                              '\'{"prompt": "instruction", "query": "input", "response": "output"}\'') from None
    if not isinstance(map_keys, dict):
        raise ConfigError(f"map_keys: expected a JSON object of key -> column name, got {type(map_keys).__name__}")
    bad = [k for k in map_keys if k not in KNOWN_MAP_KEYS]
    if bad:
        import difflib
        hint = difflib.get_close_matches(bad[0], KNOWN_MAP_KEYS, n=1)
        raise ConfigError(f"map_keys: unknown key {bad[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known keys: {', '.join(KNOWN_MAP_KEYS)}")
    for k, v in map_keys.items():
        if not isinstance(v, str):
            raise ConfigError(f"map_keys: value of {k!r} must be a column name string, got {v!r}")
    return dict(map_keys)


def detect_format(record, map_keys: Optional[dict] = None) -> Optional[str]:
    """The format of one record ('alpaca' | 'sharegpt' | 'messages'), or None if it matches none."""
    mk = map_keys or {}
    if not isinstance(record, dict):
        return None
    if mk.get("messages") and mk["messages"] in record:
        value = record[mk["messages"]]
        if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
            return "sharegpt"
        return "messages" if mk["messages"] != "conversations" else "sharegpt"
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if mk.get("prompt", ALPACA_KEYS["prompt"]) in record:
        return "alpaca"
    return None


def _text(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise RecordError(f"{what} is missing (null)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecordError(f"{what} must be a string, found {type(value).__name__}")


def _maybe_json_list(value, what: str):
    """CSV/Parquet columns may hold a JSON-encoded list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(f"{what}: not a valid JSON list ({e.msg})") from None
    return value


def _alpaca(record: dict, mk: dict, alpaca_prompt: str) -> Conversation:
    keys = {k: mk.get(k, d) for k, d in ALPACA_KEYS.items()}
    if keys["prompt"] not in record:
        raise RecordError(f"missing field {keys['prompt']!r} (alpaca prompt)")
    if keys["response"] not in record:
        raise RecordError(f"missing field {keys['response']!r} (alpaca response)")
    instruction = _text(record[keys["prompt"]], f"field {keys['prompt']!r}")
    query = record.get(keys["query"])
    query = "" if query is None else _text(query, f"field {keys['query']!r}")
    response = _text(record[keys["response"]], f"field {keys['response']!r}")
    if alpaca_prompt == "stanford":
        prompt = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=query) if query != ""
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    else:
        prompt = instruction + "\n" + query if query != "" else instruction
    turns = []
    history = _maybe_json_list(record.get(keys["history"]), f"field {keys['history']!r}")
    if history:
        if not isinstance(history, list):
            raise RecordError(f"field {keys['history']!r} must be a list of [query, response] pairs")
        for j, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RecordError(f"field {keys['history']!r}[{j}] must be a [query, response] pair")
            turns.append(("user", _text(pair[0], f"{keys['history']}[{j}][0]")))
            turns.append(("assistant", _text(pair[1], f"{keys['history']}[{j}][1]")))
    turns += [("user", prompt), ("assistant", response)]
    system = record.get(keys["system"])
    system = None if system is None or system == "" else _text(system, f"field {keys['system']!r}")
    return _check(Conversation(turns=turns, system=system))


def _chat(record: dict, mk: dict, fmt: str) -> Conversation:
    list_key = mk.get("messages") or ("conversations" if fmt == "sharegpt" else "messages")
    if list_key not in record:
        raise RecordError(f"missing field {list_key!r} ({fmt})")
    msgs = _maybe_json_list(record[list_key], f"field {list_key!r}")
    if not isinstance(msgs, list):
        raise RecordError(f"field {list_key!r} must be a list of messages, found {type(msgs).__name__}")
    if not msgs:
        raise RecordError(f"empty conversation (field {list_key!r} is an empty list)")
    role_tags = [mk["role_tag"]] if mk.get("role_tag") else ["from", "role"]
    content_tags = [mk["content_tag"]] if mk.get("content_tag") else ["value", "content"]
    users = USER_ROLES | ({mk["user_tag"]} if mk.get("user_tag") else set())
    assistants = ASSISTANT_ROLES | ({mk["assistant_tag"]} if mk.get("assistant_tag") else set())
    systems = SYSTEM_ROLES | ({mk["system_tag"]} if mk.get("system_tag") else set())
    system, turns, dropped, reasoning = None, [], 0, {}
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{list_key}[{j}] must be an object with role and content, found {type(m).__name__}")
        rk = next((k for k in role_tags if k in m), None)
        ck = next((k for k in content_tags if k in m), None)
        if rk is None:
            raise RecordError(f"{list_key}[{j}]: missing role field ({' or '.join(map(repr, role_tags))})")
        if ck is None:
            raise RecordError(f"{list_key}[{j}]: missing content field ({' or '.join(map(repr, content_tags))})")
        role = m[rk]
        if not isinstance(role, str):
            raise RecordError(f"{list_key}[{j}].{rk} must be a string role, found {type(role).__name__}")
        content = _text(m[ck], f"{list_key}[{j}].{ck}")
        if role in systems:
            if j != 0:
                raise RecordError(f"wrong role order: {list_key}[{j}] is a system message after the first message")
            system = content
            continue
        if role in users:
            role = "user"
        elif role in assistants:
            role = "assistant"
        else:
            raise RecordError(f"{list_key}[{j}]: unknown role {role!r}; expected one of "
                              f"{sorted(users | assistants | systems)}")
        if not turns and role == "assistant":
            dropped += 1                # FastChat: "Skip the first one if it is not from human"
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(f"wrong role order: {list_key}[{j}] is {role!r}, expected {expected!r} "
                              f"(turns must alternate user/assistant)")
        if m.get(REASONING_KEY) is not None:
            if role != "assistant":
                raise RecordError(f"{list_key}[{j}]: {REASONING_KEY} on a {role} message; only assistant messages "
                                  "carry reasoning")
            reasoning[len(turns)] = _text(m[REASONING_KEY], f"{list_key}[{j}].{REASONING_KEY}")
        turns.append((role, content))
    return _check(Conversation(turns=turns, system=system, dropped_leading=dropped, reasoning=reasoning))


def _check(conv: Conversation) -> Conversation:
    if not conv.turns:
        raise RecordError("empty conversation (no user/assistant turns)")
    if conv.turns[-1][0] != "assistant":
        if len(conv.turns) == 1:
            raise RecordError("conversation has no assistant reply")
        raise RecordError("conversation ends with a user turn (no assistant reply to learn)")
    for j, (role, content) in enumerate(conv.turns):
        if content == "" or (role == "assistant" and not content.strip()):
            raise RecordError(f"empty {role} message at turn {j}")
    return conv


def to_conversation(record, fmt: str, map_keys: Optional[dict] = None, alpaca_prompt: str = "stanford"
                    ) -> Conversation:
    """Normalize one raw record of format `fmt` into a Conversation (RecordError when impossible)."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, found {type(record).__name__}")
    mk = map_keys or {}
    if fmt == "alpaca":
        return _alpaca(record, mk, alpaca_prompt)
    if fmt in ("sharegpt", "messages"):
        return _chat(record, mk, fmt)
    raise ConfigError(f"data_format {fmt!r} is not supported; expected one of auto, {', '.join(FORMATS)}")
