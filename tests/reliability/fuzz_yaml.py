"""Seeded YAML mutations of configs/stories260k/lora_stories260k.yaml: key typos, wrong value types, wrong nesting.
Each mutation is one line change, and knows the key it touched and that line."""
import os
import random
import re

from tests.paths import ROOT

BASE = os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml")
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(\s*)(.*?)(\s+#.*)?$")
KINDS = ("typo", "wrong_type", "wrong_nesting")


def base_lines():
    with open(BASE, encoding="utf-8") as f:
        return f.read().split("\n")


def _typo(key, rng):
    while True:
        i = rng.randrange(len(key))
        op = rng.randrange(3)
        if op == 0 and len(key) > 2:
            new = key[:i] + key[i + 1:]                                   # a letter dropped
        elif op == 1 and i + 1 < len(key) and key[i] != key[i + 1]:
            new = key[:i] + key[i + 1] + key[i] + key[i + 2:]             # two letters swapped
        else:
            new = key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + key[i:]   # a letter added
        if new != key and new.lower() != key.lower():
            return new


def _wrong_value(value, rng):
    """A YAML value of a clearly different kind than `value`."""
    v = value.strip().strip("'\"")
    if v.lower() in ("true", "false"):
        return rng.choice(("12", "[1, 2]", "{a: 1}"))
    if re.fullmatch(r"-?[0-9.e+-]+", v):
        return rng.choice(("'lots'", "[1, 2]", "{a: 1}", "True"))
    return rng.choice(("[1, 2]", "{a: 1}", "123"))


def mutations(n=200, seed=1234):
    """[(kind, key, line number (1-based), mutated text)]."""
    rng = random.Random(seed)
    lines = base_lines()
    keyed = [i for i, l in enumerate(lines) if _KEY_LINE.match(l) and not l.lstrip().startswith("- ")
             and "<<" not in l]
    scalar = [i for i in keyed if _KEY_LINE.match(lines[i]).group(4) not in ("", "&train_dataset")]
    out = []
    for _ in range(n):
        kind = rng.choice(KINDS)
        i = rng.choice(scalar if kind != "typo" else keyed)
        indent, key, sp, value, comment = _KEY_LINE.match(lines[i]).groups()
        new = list(lines)
        if kind == "typo":
            key = _typo(key, rng)
            new[i] = f"{indent}{key}:{sp}{value}{comment or ''}"
        elif kind == "wrong_type":
            new[i] = f"{indent}{key}: {_wrong_value(value, rng)}"
        else:   # a key moved one level deeper (under a sibling that holds a value) or to the top level
            prev = _KEY_LINE.match(lines[i - 1])
            deeper = prev is not None and prev.group(1) == indent and prev.group(4) not in ("", "&train_dataset")
            if indent and (not deeper or rng.random() < 0.5):
                new[i] = f"{key}: {value}"
            else:
                new[i] = f"{indent}  {key}: {value}"
        out.append((kind, key, i + 1, "\n".join(new)))
    return out
