"""Seeded record fuzzer: 1000 records per input format from the bundled data, most of them mutated (broken JSON,
wrong types, missing or unknown roles and keys, non-UTF-8 bytes, huge lines, empty conversations), one record per
line so that every record has a known line."""
import json
import random

from tests.paths import ALPACA, SHAREGPT

N = 1000
HUGE_CHARS = 64_000
MUTATIONS = ("broken_json", "wrong_type", "missing_field", "unknown_role", "non_utf8", "huge", "empty",
             "unknown_key")
_JUNK = '{}[],:"\\ x0'
_BAD_BYTES = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xfe")
_WRONG = (123, None, [1, 2], {"a": 1}, True, 1.5, "")


def base_records(fmt):
    with open(ALPACA if fmt == "alpaca" else SHAREGPT, encoding="utf-8") as f:
        recs = json.load(f)
    if fmt == "messages":
        role = {"human": "user", "gpt": "assistant"}
        recs = [{"messages": [{"role": role[m["from"]], "content": m["value"]} for m in r["conversations"]]}
                for r in recs]
    return recs


def _turns(rec):
    return rec.get("conversations") or rec.get("messages") or []


def _mutate(rec, kind, rng):
    """(bytes of the record's line, whether the record must be rejected)."""
    rec = json.loads(json.dumps(rec))
    turns = _turns(rec)
    if kind == "broken_json":
        s = json.dumps(rec, ensure_ascii=False)
        i = rng.randrange(1, len(s) - 1)
        s = rng.choice((s[:i], s[:i] + s[i + 1:], s[:i] + rng.choice(_JUNK) + s[i:]))
        try:                                   # a mutation that is still a valid record object is not a fault
            bad = not isinstance(json.loads(s), dict)
        except ValueError:
            bad = True
        return s.encode("utf-8"), (True if bad else None)
    if kind == "wrong_type":
        if turns and rng.random() < 0.5:
            m = rng.choice(turns)
            m[rng.choice(sorted(m))] = rng.choice(_WRONG)
        else:
            rec[rng.choice(sorted(rec))] = rng.choice(_WRONG)
        return json.dumps(rec).encode(), None  # some wrong types are read fine ("" input, 1.5 id): not forced
    if kind == "missing_field":
        if turns:
            del rng.choice(turns)[rng.choice(("from", "value") if "from" in turns[0] else ("role", "content"))]
        else:
            del rec[rng.choice(("instruction", "output"))]
        return json.dumps(rec).encode(), True
    if kind == "unknown_role":
        if turns:
            m = rng.choice(turns)
            m["from" if "from" in m else "role"] = rng.choice(("wizard", "HUMAN", "", "robot"))
            return json.dumps(rec).encode(), True
        return json.dumps({**rec, "role": "wizard"}).encode(), None
    if kind == "non_utf8":
        s = json.dumps(rec, ensure_ascii=False).encode("utf-8")
        i = s.index(b'"', s.index(b":")) + 1                 # inside the first string value
        return s[:i] + rng.choice(_BAD_BYTES) + s[i:], True
    if kind == "huge":
        if turns:
            rng.choice(turns)["value" if "from" in turns[0] else "content"] = "lorem ipsum " * (HUGE_CHARS // 12)
        else:
            rec[rng.choice(("instruction", "output"))] = "lorem ipsum " * (HUGE_CHARS // 12)
        return json.dumps(rec).encode(), None    # kept truncated, or rejected when no answer token is left
    if kind == "empty":
        return rng.choice((b"{}", b"[]", b"null", b'{"conversations": []}', b'{"messages": []}',
                           b'{"instruction": "", "output": ""}', b'""')), True
    rec["x_" + str(rng.randrange(100))] = rng.choice(_WRONG)   # unknown_key
    return json.dumps(rec).encode(), None


def fuzz(fmt, seed=1234, n=N, p_mutate=0.6):
    """[(line bytes, kind or None, must_reject True/False/None)] of n records of `fmt`."""
    rng = random.Random(f"{seed}-{fmt}")
    base = base_records(fmt)
    out = []
    for i in range(n):
        rec = base[i % len(base)]
        if rng.random() < p_mutate:
            kind = rng.choice(MUTATIONS)
            line, must = _mutate(rec, kind, rng)
            out.append((line, kind, must))
        else:
            out.append((json.dumps(rec, ensure_ascii=False).encode("utf-8"), None, False))
    return out


def write_jsonl(path, records):
    """Record i on line i + 1."""
    with open(path, "wb") as f:
        f.write(b"\n".join(r[0] for r in records) + b"\n")
    return [i + 1 for i in range(len(records))]


def write_json_array(path, records):
    """A JSON array, one record per line ("  {...},"): record i on line i + 2."""
    with open(path, "wb") as f:
        f.write(b"[\n" + b",\n".join(b"  " + r[0] for r in records) + b"\n]\n")
    return [i + 2 for i in range(len(records))]


_CSV_COLUMNS = ("instruction", "input", "output")


def _csv_row(values):
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode("utf-8")


def fuzz_csv(seed=1234, n=N, p_mutate=0.6):
    """[(row bytes incl. its newline, kind or None, must_reject)] of n Alpaca CSV rows (columns instruction,input,
    output); the mutations CSV can hold: a missing or extra column, non-UTF-8 bytes, a huge or an empty field."""
    rng = random.Random(f"{seed}-csv")
    base = base_records("alpaca")
    out = []
    for i in range(n):
        vals = [base[i % len(base)][c] for c in _CSV_COLUMNS]
        kind, must = None, False
        if rng.random() < p_mutate:
            kind = rng.choice(("missing_field", "unknown_key", "non_utf8", "huge", "empty"))
            if kind == "missing_field":
                vals, must = vals[:rng.choice((1, 2))], True
            elif kind == "unknown_key":
                vals, must = vals + ["extra"], True
            elif kind == "huge":
                vals[rng.choice((0, 2))], must = "lorem ipsum " * (HUGE_CHARS // 12), None
            elif kind == "empty":
                vals, must = ["", "", ""], True
        row = _csv_row(vals)
        if kind == "non_utf8":
            row, must = row[:1] + rng.choice(_BAD_BYTES) + row[1:], True
        out.append((row, kind, must))
    return out


def write_csv(path, records):
    """A header line, then the rows (a row may span lines: quoted newlines); returns each row's first line."""
    lines, line = [], 2
    with open(path, "wb") as f:
        f.write(_csv_row(_CSV_COLUMNS))
        for row, _, _ in records:
            f.write(row)
            lines.append(line)
            line += row.count(b"\n")
    return lines
