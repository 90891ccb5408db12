"""`train_dataset.data_loader.type: HFDataLoader` (MindFormers 1.6+): Hugging Face ``datasets`` -> handler chain
(data/handlers.py) -> training rows.

As in MindFormers, ``load_func`` (``load_dataset`` | ``load_from_disk``) is called with every data_loader key
that is not the loader's own (``path``, ``split``, ``data_files``, ``name``, ``streaming``, ...), so
``path: json`` + ``data_files: data.jsonl`` reads local files, and parquet, csv, arrow, a local dataset folder
or a ``save_to_disk`` folder work the same way. When everything named is local, datasets runs offline
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``): no network attempt. ``streaming: True`` reads lazily (files
larger than memory); only the tokenized rows are kept. A datasets error is re-raised naming the file.

Rows are held as this suite's training rows (data/rows.py ArrayDataset: ``input_ids``/``labels`` of
``seq_length + 1``, unshifted, and ``actual_seq_len`` when packed). ``HFRowsDataset.mf_row`` gives the columns
MindFormers' HFDataLoader yields (``input_columns``): ``input_ids`` and ``labels`` of ``seq_length`` (labels
shifted: the token each position predicts, -100 where not supervised), ``loss_mask``, ``position_ids``
(restarting per packed sample), ``actual_seq_len`` (sample end offsets padded with seq_length to
``compressed_eod_mask_length``, with ``create_compressed_eod_mask``) and ``attention_mask`` ([1, S, S],
1 = masked).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from ..errors import ConfigError, DataError
from .packing import pad_row, positions_and_segments
from .rows import ArrayDataset
from .tokenize import IGNORE_INDEX, Sample

MF_COLUMNS = ("input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len", "attention_mask")
# data_loader keys that belong to the loader; all others go to datasets.<load_func>
LOADER_KEYS = {"type", "load_func", "dataset_dir", "shuffle", "tokenizer", "handler", "create_attention_mask",
               "create_compressed_eod_mask", "compressed_eod_mask_length", "use_broadcast_data", "size",
               "dataset_state_dir", "save_step", "resume_step", "num_proc", "rejects_file", "column_names",
               "batch_size", "packing", "adaptor_config"}
LOAD_FUNCS = ("load_dataset", "load_from_disk")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
                 ".txt": "text"}
PACKAGED = set(FILE_BUILDERS.values()) | {"pandas", "imagefolder", "audiofolder"}


def _files(v) -> list:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [f for x in v.values() for f in _files(x)]
    return [f for x in v for f in _files(x)]


def _is_local(path) -> bool:
    return isinstance(path, str) and (os.path.exists(path) or bool(glob.glob(path)))


def load_args(dl: dict):
    """(load_func name, kwargs for it, [local files named]) from a data_loader section."""
    func = dl.get("load_func") or "load_dataset"
    if func not in LOAD_FUNCS:
        raise ConfigError(f"data_loader.load_func: '{func}' is not one of {', '.join(LOAD_FUNCS)}")
    kw = {k: v for k, v in dl.items() if k not in LOADER_KEYS and v is not None and v != ""}
    local_dir = dl.get("dataset_dir")
    if local_dir:                                   # --train_dataset_dir: the data is here (path/data_files yield)
        kw.pop("data_files", None)
        if func == "load_from_disk" or os.path.isdir(local_dir):
            kw["path"] = local_dir
        else:
            kw["path"], kw["data_files"] = None, local_dir
    if func == "load_from_disk":
        if "path" in kw:
            kw["dataset_path"] = kw.pop("path")
        if "dataset_path" not in kw:
            raise ConfigError("data_loader: load_from_disk needs path (a folder written by save_to_disk)")
        split = kw.pop("split", None)
        extra = sorted(set(kw) - {"dataset_path", "keep_in_memory", "storage_options"})
        if extra:
            raise ConfigError(f"data_loader: load_from_disk takes no '{extra[0]}' (it takes path, keep_in_memory, "
                              f"storage_options; split picks a split of a saved DatasetDict)")
        return func, kw, split, [kw["dataset_path"]]
    path = kw.get("path")
    if isinstance(path, str) and os.path.isfile(path) and os.path.splitext(path)[1].lower() in FILE_BUILDERS:
        if kw.get("data_files"):
            raise ConfigError(f"data_loader: path {path} is a data file and data_files is set too; give one")
        kw["data_files"], kw["path"] = path, None      # a data file as path: datasets wants path: json + data_files
    if not kw.get("path"):
        files = _files(kw.get("data_files"))
        ext = os.path.splitext(files[0])[1].lower() if files else ""
        if ext not in FILE_BUILDERS:
            raise ConfigError("data_loader: HFDataLoader needs path (a dataset name, a local folder, or json/csv/"
                              "parquet/arrow with data_files)")
        kw["path"] = FILE_BUILDERS[ext]
    named = _files(kw.get("data_files")) + _files(kw.get("data_dir"))
    if kw["path"] not in PACKAGED:
        named.append(kw["path"])
    return func, kw, kw.pop("split", None), named


@contextlib.contextmanager
def offline(on: bool):
    """datasets and huggingface_hub in offline mode (env and their already-read constants), restored after."""
    if not on:
        yield
        return
    import datasets.config as dc
    import huggingface_hub.constants as hc
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved = (dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE)
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _culprit(err: BaseException, files: list) -> Optional[str]:
    e, seen = err, 0
    while e is not None and seen < 10:
        for f in files:
            if os.path.basename(f) in str(e):
                return f
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def load(dl: dict, cache_dir: str = ""):
    """The datasets Dataset / IterableDataset a data_loader section names (one split). Local data is converted
    into `cache_dir` (the run's scratch dir) unless the section names its own cache_dir."""
    import datasets
    func, kw, split, named = load_args(dl)
    local = bool(named) and all(_is_local(f) for f in named)
    missing = [f for f in named if not _is_local(f) and (os.path.isabs(f) or f.startswith(".")
                                                          or os.path.splitext(f)[1] in FILE_BUILDERS)]
    if missing:
        raise DataError(f"{missing[0]}: data file or folder not found (data_loader {func})")
    call_kw = dict(kw, split=split) if func == "load_dataset" and split is not None else dict(kw)
    if func == "load_dataset" and local and cache_dir:
        call_kw.setdefault("cache_dir", cache_dir)
    try:
        with offline(local):
            ds = getattr(datasets, func)(**call_kw)
    except Exception as e:                         # datasets raises many kinds; say which file and what
        files = [f for n in named for f in (sorted(glob.glob(n)) or [n])]
        culprit = _culprit(e, files)
        if culprit is None and len(files) > 1 and func == "load_dataset" and local:
            for f in files:                           # find the file that fails on its own
                try:
                    with offline(True), tempfile.TemporaryDirectory() as tmp:
                        datasets.load_dataset(kw["path"], data_files=f, split="train", cache_dir=tmp)
                except Exception:                     # noqa: BLE001 - probing for the failing file
                    culprit = f
                    break
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        detail = f"{type(e).__name__}: {e}" + (f" ({type(cause).__name__}: {cause})" if cause is not e else "")
        raise DataError(f"{culprit or ', '.join(files) or kw.get('path')}: datasets.{func} failed: {detail}") from e
    part = None
    if func == "load_from_disk" and split and "[" in str(split):       # "train[:90%]" as load_dataset reads it
        split, part = str(split).split("[", 1)[0].strip(), split
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        pick = split or ("train" if "train" in ds else None)
        if pick not in ds:
            raise ConfigError(f"data_loader.split: '{pick}' is not a split of {named[0] if named else kw}; "
                              f"splits: {', '.join(ds)}")
        ds = ds[pick]
    if part is not None:
        from .split import split_range
        start, stop = split_range(part, len(ds), "data_loader.split")
        ds = ds.select(range(start, stop))
    return ds


def check_input_columns(columns, dl: dict):
    cols = list(columns or ["input_ids", "labels"])
    for c in cols:
        if c not in MF_COLUMNS:
            raise ConfigError(f"train_dataset.input_columns: '{c}' is not a column this loader makes; its columns "
                              f"are: {', '.join(MF_COLUMNS)}")
    if "actual_seq_len" in cols and not dl.get("create_compressed_eod_mask"):
        raise ConfigError("train_dataset.input_columns has 'actual_seq_len': set data_loader."
                          "create_compressed_eod_mask: True (MindFormers yields it only then)")
    return cols


class HFRowsDataset(ArrayDataset):
    """Training rows from HFDataLoader, with MindFormers' column view (`mf_row`)."""

    def __init__(self, input_ids, labels, actual_seq_len, source, columns, compressed_len: Optional[int],
                 rejects=()):
        super().__init__(input_ids, labels, actual_seq_len, source=source)
        self.columns, self.compressed_len, self.rejects = list(columns), compressed_len, list(rejects)

    def mf_row(self, i) -> tuple:
        S = self.seq_length
        ids, labels = self.input_ids[i], self.labels[i]
        asl = self.actual_seq_len[i] if self.actual_seq_len is not None else np.array([S], np.int32)
        pos, seg = positions_and_segments(asl, S)
        cols = {"input_ids": ids[:S].copy(), "labels": labels[1:].copy(),
                "loss_mask": (labels[1:] != IGNORE_INDEX).astype(np.int32), "position_ids": pos}
        if "actual_seq_len" in self.columns:
            ends = np.unique(np.minimum(asl, S))
            ends = ends[ends > 0]
            n = self.compressed_len
            if len(ends) > n:
                raise DataError(f"{self.source}: row {i} holds {len(ends)} samples > compressed_eod_mask_length {n}")
            cols["actual_seq_len"] = np.concatenate([ends, np.full(n - len(ends), S)]).astype(np.int32)
        if "attention_mask" in self.columns:
            same = (seg[:, None] == seg[None, :]) & (np.tril(np.ones((S, S), bool)))
            cols["attention_mask"] = (~same)[None].astype(np.int32)
        return tuple(cols[c] for c in self.columns)


def label_layout(x, y) -> Optional[str]:
    """'same' when the supervised labels sit on their own tokens (MindRecord schema, rows of seq_length + 1),
    'shifted' when each is the next token (MindFormers 1.6+ handlers' rows of seq_length), None when the row
    cannot tell (nothing supervised, or both hold), 'neither' when the labels match no input token."""
    sup = y != IGNORE_INDEX
    if not sup.any():
        return None
    same = bool((y[sup] == x[sup]).all())
    nxt = sup[:-1]
    shifted = bool((y[:-1][nxt] == x[1:][nxt]).all()) and nxt.any()
    if same != shifted:
        return "same" if same else "shifted"
    return None if same else "neither"


def to_rows(ds, seq_length: int, pad_id: int, source: str, layout: Optional[str] = "same"):
    """(input_ids [N, S+1], labels [N, S+1], actual_seq_len or None) from a dataset of rows. `layout` None: rows the
    handlers did not make (pre-tokenized data); their label layout is read from the rows themselves (label_layout),
    and rows in MindFormers' 1.6+ layout (labels shifted, optional loss_mask) become this suite's rows."""
    ids, labels, asl = [], [], []
    for i, r in enumerate(ds):
        if "input_ids" not in r or "labels" not in r:
            raise DataError(f"{source}: after the handlers the dataset has no 'input_ids'/'labels' column; its "
                            f"columns are: {', '.join(r)} (add AlpacaInstructDataHandler or ChatDataHandler)")
        x, y = np.asarray(r["input_ids"], np.int32), np.asarray(r["labels"], np.int32)
        if layout is None:
            layout = label_layout(x, y)
            if layout == "neither":
                raise DataError(f"{source}: row {i}: the labels match neither input_ids nor input_ids shifted by "
                                "one; expected labels -100 where not supervised")
        if layout == "shifted":                     # MindFormers 1.6+: x[t] predicts y[t]; loss_mask marks the loss
            keep = np.asarray(r["loss_mask"], bool) if r.get("loss_mask") is not None else y != IGNORE_INDEX
            x = np.concatenate([x, [pad_id]]).astype(np.int32)
            y = np.concatenate([[IGNORE_INDEX], np.where(keep, y, IGNORE_INDEX)]).astype(np.int32)
        if (seq_length and len(x) > seq_length + 1) or len(x) != len(y):
            raise DataError(f"{source}: row {i} has {len(x)} input_ids / {len(y)} labels; expected equal lengths "
                            f"of at most seq_length + 1 = {seq_length + 1}")
        ids.append(x)
        labels.append(y)
        if r.get("actual_seq_len") is not None:
            asl.append(np.asarray(r["actual_seq_len"], np.int32))
    if not ids:
        raise DataError(f"{source}: no rows after the handlers")
    if asl and len(asl) != len(ids):
        raise DataError(f"{source}: some rows are packed (actual_seq_len) and some are not")
    seq_length = seq_length or max(len(x) for x in ids) - 1      # pre-tokenized rows: the longest says
    rows = [pad_row(Sample(x, y, None), seq_length, pad_id) for x, y in zip(ids, labels)]
    return (np.stack([r["input_ids"] for r in rows]), np.stack([r["labels"] for r in rows]),
            np.stack(asl) if asl else None)


def legacy_args(dl: dict) -> dict:
    """MindFormers' older HFDataLoader keys, as it reads them: `packing` (the pack_strategy of a PackingHandler
    that names none) and `adaptor_config` {compress_mask, eod_pad_length}."""
    packing = dl.pop("packing", None)
    steps = dl.get("handler")
    if packing and isinstance(steps, list):
        dl["handler"] = [dict(s, pack_strategy=s.get("pack_strategy", packing))
                         if isinstance(s, dict) and s.get("type") == "PackingHandler" else s for s in steps]
    adaptor = dl.pop("adaptor_config", None)
    if isinstance(adaptor, dict):
        dl["create_compressed_eod_mask"] = bool(adaptor.get("compress_mask", False))
        dl["compressed_eod_mask_length"] = adaptor.get("eod_pad_length", 128)
    return dl


def refuse_loader(kind: str):
    raise ConfigError(f"train_dataset.data_loader.type {kind} (Megatron .bin/.idx data) is not supported here; use "
                      "HFDataLoader (json/jsonl/parquet/csv/arrow, datasets folders) or MindDataset (MindRecord)")


def build_hf_dataset(section: dict, tokenizer_path: str, seq_length: Optional[int], log=print) -> HFRowsDataset:
    from .handlers import ChainContext, run_chain
    from .pipeline import pad_id_of
    dl = legacy_args(dict(section.get("data_loader") or {}))
    columns = check_input_columns(section.get("input_columns"), dl)
    _, kw, _, named = load_args(dl)
    source = ", ".join(named) or str(kw.get("path"))
    workers = dl.get("num_proc") or section.get("num_parallel_workers") or 1
    import datasets
    datasets.disable_progress_bars()
    scratch = tempfile.mkdtemp(prefix="mfsft_hf_")
    try:
        ds = load(dl, scratch)
        ctx = ChainContext(source=source, tokenizer_path=dl.get("tokenizer") or tokenizer_path,
                           seq_length=seq_length, num_proc=max(1, min(int(workers), os.cpu_count() or 1)),
                           cache_dir=scratch)
        ds = run_chain(ds, dl.get("handler"), ctx)
        seq = int(ctx.seq_length or seq_length or 0)
        pad_id = pad_id_of(ctx.tokenizer) if ctx.tokenizer_path else 0
        if ctx.made_rows:
            ids, labels, asl = to_rows(ds, seq, pad_id, source)
        else:                                       # pre-tokenized rows: their layout and length from the rows
            ids, labels, asl = to_rows(ds, 0, pad_id, source, layout=None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ctx.rejects:
        log(f"[data] {source}: {len(ctx.rejects)} records not used; first: {ctx.rejects[0][0]}: {ctx.rejects[0][1]}")
        if dl.get("rejects_file"):
            import json
            with open(dl["rejects_file"], "w", encoding="utf-8") as f:
                for loc, reason in ctx.rejects:
                    f.write(json.dumps({**loc.as_dict(), "reason": reason}, ensure_ascii=False) + "\n")
    out = HFRowsDataset(ids, labels, asl, source, columns, int(dl.get("compressed_eod_mask_length") or 128),
                        ctx.rejects)
    log(f"[data] HFDataLoader {source}: {len(out)} rows of {out.seq_length + 1} tokens"
        + (" (packed)" if asl is not None else ""))
    return out
