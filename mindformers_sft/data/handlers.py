"""HFDataLoader `handler` steps, by MindFormers' names, each one a Hugging Face ``datasets`` operation.

* generic steps (MindFormers hands the step to the ``datasets.Dataset`` method of that name): ``take`` (n),
  ``skip``, ``select``, ``shuffle`` (seed), ``sort`` (column_names, reverse), ``flatten``, ``rename_column``
  (original_column_name, new_column_name), ``rename_columns``, ``remove_columns`` / ``select_columns``
  (column_names), ``filter`` (function: ``"package.module:function"``, input_columns, batched, ...);
* ``AlpacaInstructDataHandler`` (instruction/input/output records) and ``ChatDataHandler`` (``messages`` or
  ShareGPT ``conversations`` records): tokenize + mask with this suite's own code (data/formats.py,
  data/templates.py, data/tokenize.py), through ``Dataset.map`` in ``num_proc`` processes. The default template
  of the Alpaca handler is ``vicuna_v1.1``: MindFormers' handler writes exactly that text (its system prompt,
  ``USER: ... ASSISTANT: ...</s>``); the chat handler's is the tokenizer's own chat_template (``auto``);
* ``PackingHandler``: ``pack_strategy: pack`` (samples in order, a new row when the next one does not fit:
  data/packing.py's ``sequential``), ``truncate`` (all samples concatenated and cut into rows; a sample may
  continue in the next row) and ``greedy`` (ours: best-fit decreasing).

Rows are this suite's (MindFormers' MindRecord schema): ``input_ids``/``labels`` unshifted, at most
``seq_length + 1`` long, -100 where not supervised; packed rows add ``actual_seq_len``. So the rows equal
``python -m mindformers_sft.tools.preprocess`` rows for the same data, template and packing.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..config.schema import HANDLERS, OPEN
from ..errors import ConfigError, DataError
from .formats import ALPACA_KEYS, Location, RecordError, detect_format, to_conversation
from .packing import Packer, default_pack_max_samples, pack_row
from .pipeline import SFTOptions, make_encoder, pad_id_of
from .tokenize import IGNORE_INDEX, Sample

PACK_STRATEGIES = {"pack": "sequential", "greedy": "greedy", "truncate": "truncate"}
REJECT = "_reject"


@dataclass
class ChainContext:
    """What the steps share: where the data came from, the tokenizer, processes, a scratch dir for map caches."""
    source: str
    tokenizer_path: str
    seq_length: Optional[int]
    num_proc: int = 1
    cache_dir: str = ""
    rejects: list = field(default_factory=list)        # (Location, reason)
    made_rows: bool = False                              # a tokenizing or packing step wrote input_ids/labels
    _tokenizer: object = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_path:
                raise ConfigError("HFDataLoader: a tokenizing handler needs a tokenizer: set pretrained_model_dir or "
                                  "processor.tokenizer.vocab_file")
            from ..tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer


def columns_of(ds) -> list:
    cols = getattr(ds, "column_names", None)
    if cols is None:                                     # an IterableDataset whose features are not resolved
        cols = list(next(iter(ds)).keys())
    return list(cols)


def need_columns(ds, names, step: str):
    present = columns_of(ds)
    for n in names:
        if n not in present:
            raise DataError(f"{step}: the dataset has no column '{n}'; its columns are: {', '.join(present)}")


def _fingerprint(ds, *parts) -> str:
    h = hashlib.sha256(str(getattr(ds, "_fingerprint", "")).encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _map_args(ds, ctx: ChainContext, name: str, parts, num_proc=None) -> dict:
    """Keyword arguments for Dataset.map/filter: processes, and a cache file in the run's scratch dir named by
    a fingerprint of the step (datasets need not hash the function)."""
    if not hasattr(ds, "_fingerprint"):            # IterableDataset: lazy, in this process
        return {}
    n = int(num_proc or ctx.num_proc or 1)
    fp = _fingerprint(ds, name, parts)
    return {"num_proc": n if n > 1 and len(ds) >= n else None, "new_fingerprint": fp, "load_from_cache_file": False,
            "cache_file_name": os.path.join(ctx.cache_dir, f"{name}-{fp}.arrow") if ctx.cache_dir else None}


# -- generic datasets steps --------------------------------------------------------------------------------------

_COLUMN_ARGS = {"rename_column": ("original_column_name",), "remove_columns": ("column_names",),
                "select_columns": ("column_names",), "sort": ("column_names",)}


def _import_function(spec: str, step: str):
    mod, _, fn = str(spec).partition(":")
    if not mod or not fn:
        raise ConfigError(f"{step}: function '{spec}' must be written 'package.module:function'")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{step}: cannot import function '{spec}': {e}") from None


def generic_step(ds, name: str, kwargs: dict, ctx: ChainContext, step: str):
    method = getattr(ds, name, None)
    if method is None:
        raise ConfigError(f"{step}: this dataset ({type(ds).__name__}) has no '{name}' operation")
    params = inspect.signature(method).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for k in kwargs:
            if k not in params:
                close = difflib.get_close_matches(k, list(params), n=1)
                raise ConfigError(f"{step}: '{name}' takes no argument '{k}'" +
                                  (f"; did you mean '{close[0]}'?" if close else "") +
                                  f" (datasets.Dataset.{name} arguments: {', '.join(params)})")
    for arg in _COLUMN_ARGS.get(name, ()):
        if arg in kwargs:
            cols = kwargs[arg]
            need_columns(ds, [cols] if isinstance(cols, str) else list(cols), step)
    if name == "rename_columns" and isinstance(kwargs.get("column_mapping"), dict):
        need_columns(ds, list(kwargs["column_mapping"]), step)
    if name == "filter":
        kwargs = dict(kwargs)
        kwargs["function"] = _import_function(kwargs.get("function", ""), step)
        if hasattr(ds, "_fingerprint"):
            kwargs.setdefault("num_proc", None)
    if name in ("take", "skip") and not isinstance(kwargs.get("n"), int):
        raise ConfigError(f"{step}: '{name}' needs an integer n, got {kwargs.get('n')!r}")
    return method(**kwargs)


# -- tokenizing steps ------------------------------------------------------------------------------------------

_TOKENIZERS = {}


def _encoder(tokenizer_path, opts: SFTOptions):
    key = (tokenizer_path, repr(opts))
    if key not in _TOKENIZERS:
        from ..tokenizer import load_tokenizer
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = make_encoder(load_tokenizer(tokenizer_path), opts)
    return _TOKENIZERS[key]


class EncodeBatch:
    """The function Dataset.map runs (in worker processes too): a batch of records -> one row per record,
    empty with the reason in `_reject` when the record cannot be used. Holds paths and options only, so it
    pickles small; each process builds its encoder once."""

    def __init__(self, tokenizer_path, opts: SFTOptions, fmt: str, source: str, pad_to: Optional[int], pad_id: int):
        self.tokenizer_path, self.opts, self.fmt, self.source = tokenizer_path, opts, fmt, source
        self.pad_to, self.pad_id = pad_to, pad_id

    def __call__(self, batch: dict, indices):
        enc = _encoder(self.tokenizer_path, self.opts)
        keys = list(batch)
        n = len(indices)
        out = {"input_ids": [[] for _ in range(n)], "labels": [[] for _ in range(n)], REJECT: [""] * n}
        items, pos = [], {}
        for j, idx in enumerate(indices):
            rec = {k: batch[k][j] for k in keys}
            loc = Location(self.source, int(idx))
            try:
                items.append((loc, to_conversation(rec, self.fmt, self.opts.map_keys, self.opts.alpaca_prompt)))
                pos[int(idx)] = j
            except RecordError as e:
                out[REJECT][j] = f"{self.fmt}: {e}"
        samples, rejects = enc.encode(items)
        for loc, reason in rejects:
            out[REJECT][pos[loc.index]] = reason
        for s in samples:
            j = pos[s.loc.index]
            ids, labels = s.input_ids.tolist(), s.labels.tolist()
            if self.pad_to:
                ids += [self.pad_id] * (self.pad_to - len(ids))
                labels += [IGNORE_INDEX] * (self.pad_to - len(labels))
            out["input_ids"][j], out["labels"][j] = ids, labels
        return out


def _options(kwargs: dict, ctx: ChainContext, step: str, fmt: str, template_default: str) -> SFTOptions:
    seq = kwargs.get("seq_length") or ctx.seq_length
    if not seq:
        raise ConfigError(f"{step}: seq_length is not set")
    if kwargs.get("ignore_token_id", IGNORE_INDEX) != IGNORE_INDEX:
        raise ConfigError(f"{step}: ignore_token_id must be {IGNORE_INDEX} (the loss ignores that label)")
    opts = dict(seq_length=int(seq), template=kwargs.get("template") or template_default, data_format=fmt,
                map_keys=kwargs.get("map_keys"), train_on_prompt=bool(kwargs.get("train_on_prompt", False)),
                mask_history=bool(kwargs.get("mask_history", False)),
                alpaca_prompt=kwargs.get("alpaca_prompt", "stanford"))
    for key in ("truncation", "enable_thinking"):
        if kwargs.get(key) is not None:
            opts[key] = kwargs[key]
    return SFTOptions(**opts)


TOKENIZER_PATH_KEYS = ("pretrained_model_dir", "path", "vocab_file", "tokenizer_file")


TEMPLATE_DEFAULTS = {"AlpacaInstructDataHandler": "vicuna_v1.1", "ChatDataHandler": "auto"}


def training_template(steps) -> Optional[str]:
    """The template the tokenizing handler of a chain renders with (predict/chat prompts use it too)."""
    steps = [steps] if isinstance(steps, dict) else list(steps or [])
    for s in steps:
        if isinstance(s, dict) and s.get("type") in TEMPLATE_DEFAULTS:
            return s.get("template") or TEMPLATE_DEFAULTS[s["type"]]
    return None


def tokenize_step(ds, name: str, kwargs: dict, ctx: ChainContext, step: str, pad: bool):
    block = kwargs.get("tokenizer")
    if isinstance(block, dict):          # MindFormers' tokenizer block: a path in it wins; AutoTokenizer options
        path = next((block[k] for k in TOKENIZER_PATH_KEYS if block.get(k)), None)  # (trust_remote_code, ...) are
        if path and path != ctx.tokenizer_path:                                      # accepted: files are read as is
            ctx.tokenizer_path, ctx._tokenizer = str(path), None
    if name == "AlpacaInstructDataHandler":
        opts = _options(kwargs, ctx, step, "alpaca", TEMPLATE_DEFAULTS[name])
        mk = opts.map_keys
        need_columns(ds, [mk.get("prompt", ALPACA_KEYS["prompt"]), mk.get("response", ALPACA_KEYS["response"])], step)
        fmt = "alpaca"
    else:
        fmt = kwargs.get("data_format", "auto")
        opts = _options(kwargs, ctx, step, "auto" if fmt == "auto" else fmt, TEMPLATE_DEFAULTS[name])
        if fmt == "auto":
            first = next(iter(ds.take(1)), None)
            fmt = detect_format(first, opts.map_keys) if first is not None else "messages"
            if fmt not in ("messages", "sharegpt"):
                raise DataError(f"{step}: records have neither 'messages' nor 'conversations'; its columns are: "
                                f"{', '.join(columns_of(ds))} (set data_format and map_keys)")
        need_columns(ds, [opts.map_keys.get("messages") or ("conversations" if fmt == "sharegpt" else "messages")],
                     step)
    make_encoder(ctx.tokenizer, opts)              # a bad template fails here, once, not in every worker
    pad_id = kwargs.get("pad_token_id")
    pad_id = pad_id_of(ctx.tokenizer) if pad_id is None else int(pad_id)
    fn = EncodeBatch(ctx.tokenizer_path, opts, fmt, ctx.source, opts.seq_length + 1 if pad else None, pad_id)
    batch = int(kwargs.get("batch_size") or 256)
    args = _map_args(ds, ctx, name, [kwargs, ctx.tokenizer_path, fmt], kwargs.get("num_proc"))
    return ds.map(fn, batched=True, batch_size=batch, with_indices=True, remove_columns=columns_of(ds),
                  **args)


def drop_rejects(ds, ctx: ChainContext, step: str):
    """Move the rejected records of a tokenizing step into ctx.rejects and out of the dataset."""
    if hasattr(ds, "_fingerprint"):
        reasons = ds[REJECT]
        bad = [i for i, r in enumerate(reasons) if r]
        ctx.rejects += [(Location(ctx.source, i), reasons[i]) for i in bad]
        if bad:
            keep = sorted(set(range(len(reasons))) - set(bad))
            ds = ds.select(keep)
        return ds.remove_columns([REJECT])

    def keep(reason, idx):                          # streaming: counted as the rows go by
        if reason:
            ctx.rejects.append((Location(ctx.source, idx), reason))
        return not reason
    return ds.filter(keep, input_columns=[REJECT], with_indices=True).remove_columns([REJECT])


# -- packing --------------------------------------------------------------------------------------------------------

def _samples(ds, step):
    for i, row in enumerate(ds):
        ids, labels = row["input_ids"], row["labels"]
        if len(ids) != len(labels):
            raise DataError(f"{step}: row {i} has {len(ids)} input_ids but {len(labels)} labels")
        yield Sample(np.asarray(ids, np.int32), np.asarray(labels, np.int32), Location(step, i))


def _truncate_rows(samples, seq_length: int, pad_id: int, max_samples: int):
    """MindFormers' 'truncate': samples concatenated and cut into rows of seq_length + 1; a sample cut at a row
    end continues at the start of the next row (as a new segment there)."""
    cap = seq_length + 1
    cur, room = [], cap
    for s in samples:
        a = 0
        while a < len(s.input_ids):
            take = min(room, len(s.input_ids) - a)
            cur.append(Sample(s.input_ids[a:a + take], s.labels[a:a + take], s.loc))
            a += take
            room -= take
            if room == 0 or len(cur) == max_samples:
                yield pack_row(cur, seq_length, pad_id, max_samples)
                cur, room = [], cap
    if cur:
        yield pack_row(cur, seq_length, pad_id, max_samples)


def packing_step(ds, kwargs: dict, ctx: ChainContext, step: str):
    need_columns(ds, ["input_ids", "labels"], step)
    strategy = kwargs.get("pack_strategy", "pack")
    if strategy not in PACK_STRATEGIES:
        close = difflib.get_close_matches(str(strategy), list(PACK_STRATEGIES), n=1)
        raise ConfigError(f"{step}: pack_strategy '{strategy}' is not one of {', '.join(PACK_STRATEGIES)}" +
                          (f"; did you mean '{close[0]}'?" if close else ""))
    seq = int(kwargs.get("seq_length") or ctx.seq_length or 0)
    if seq < 1:
        raise ConfigError(f"{step}: seq_length is not set")
    pad_id = kwargs.get("pad_token_id")
    if pad_id is None:                      # pre-tokenized data without a tokenizer: 0, as MindFormers pads
        pad_id = pad_id_of(ctx.tokenizer) if ctx.tokenizer_path else 0
    pad_id = int(pad_id)
    max_samples = int(kwargs.get("pack_max_samples") or default_pack_max_samples(seq))
    ctx.seq_length, ctx.made_rows = seq, True

    def rows():
        samples = _samples(ds, step)
        if PACK_STRATEGIES[strategy] == "truncate":
            yield from _truncate_rows(samples, seq, pad_id, max_samples)
            return
        packer = Packer(seq, pad_id, PACK_STRATEGIES[strategy], max_samples)
        for s in samples:
            if len(s.input_ids) > seq + 1:
                raise DataError(f"{step}: row {s.loc.index} holds {len(s.input_ids)} tokens > seq_length + 1 = "
                                f"{seq + 1}; give the tokenizing handler the same seq_length")
            yield from packer.add([s])
        yield from packer.flush()

    import datasets
    if not hasattr(ds, "_fingerprint"):
        return datasets.IterableDataset.from_generator(lambda: ({k: v.tolist() for k, v in r.items()} for r in rows()))
    cols = {"input_ids": [], "labels": [], "actual_seq_len": []}
    for r in rows():
        for k in cols:
            cols[k].append(r[k])
    if not cols["input_ids"]:
        raise DataError(f"{step}: no rows after packing (the dataset is empty)")
    return datasets.Dataset.from_dict(cols)


# -- the chain -------------------------------------------------------------------------------------------------

def run_chain(ds, steps, ctx: ChainContext):
    """Apply the handler steps (a {type: ...} or a list of them) in order."""
    steps = [steps] if isinstance(steps, dict) else list(steps or [])
    names = [s.get("type") if isinstance(s, dict) else None for s in steps]
    for i, spec in enumerate(steps):
        where = f"train_dataset.data_loader.handler[{i}]"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        name = spec["type"]
        step = f"{where} ({name})"
        if name not in HANDLERS:
            close = difflib.get_close_matches(str(name), list(HANDLERS), n=1)
            raise ConfigError(f"{where}: unknown handler '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                              + f" (handlers: {', '.join(HANDLERS)})")
        if HANDLERS[name] == OPEN:
            ds = generic_step(ds, name, kwargs, ctx, step)
        elif name == "PackingHandler":
            ds = packing_step(ds, kwargs, ctx, step)
        else:
            pad = bool(kwargs.get("padding", True)) and "PackingHandler" not in names[i + 1:]
            ds = drop_rejects(tokenize_step(ds, name, kwargs, ctx, step, pad), ctx, step)
            ctx.seq_length, ctx.made_rows = int(kwargs.get("seq_length") or ctx.seq_length), True
    return ds
