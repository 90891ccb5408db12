"""Training datasets with one interface: ``len(ds)`` and ``ds[i] -> dict`` of numpy arrays.

Every item has ``input_ids`` and ``labels`` (int32, [S+1], unshifted: the model reads input_ids[:-1] and
predicts labels[1:]). Items of packed data also have ``position_ids`` and ``segment_ids`` (int32, [S], aligned
with input_ids[:-1]): segment 1, 2, ... per sample and 0 for padding; position ids restart at 0 per sample.
Shuffling and data-parallel sharding are done over indices by data/sampler.py's BatchPlan, so datasets only
need random access.

* :class:`MindRecordDataset` -- MindFormers-schema MindRecord files (streamed once into an on-disk row cache,
  rows read on demand: RAM does not grow with the file).
* :class:`OnlineSFTDataset` -- raw JSON/JSONL/Parquet/CSV data tokenized, masked and packed at load time by the
  same code as tools/preprocess.py (like MindFormers' AlpacaInstructDataHandler).
* :func:`build_dataset` -- either, from the YAML ``train_dataset`` section.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from typing import Optional


from ..errors import ConfigError, DataError
from .pipeline import SFTOptions, iter_rows
from .rowcache import RowCacheWriter, open_cache
from .rows import ArrayDataset
from .stats import RejectLog, Stats
from .truncation import DEFAULT_TRUNCATION

logger = logging.getLogger(__name__)


class MindRecordDataset(ArrayDataset):
    """MindRecord file(s) in MindFormers' schema: a file (with its shards), a directory, a glob or a list.

    seq_length, when given, is checked against the rows (S+1 long)."""

    def __init__(self, path, seq_length: Optional[int] = None, cache_dir: Optional[str] = None):
        from .mindrecord import cache_mindrecord
        ids, labels, asl, files = cache_mindrecord(path, cache_dir)
        self.files = files
        # rows stay on disk (rowcache.RowFile, read by offset); ArrayDataset's item code reads them unchanged
        self.input_ids, self.labels, self.actual_seq_len, self.source = ids, labels, asl, files[0]
        if len(self) == 0:
            raise DataError(f"{files[0]}: the MindRecord dataset has no rows")
        if seq_length is not None and self.seq_length != int(seq_length):
            raise ConfigError(f"{files[0]}: rows hold {self.seq_length + 1} tokens, but seq_length is {seq_length} "
                              f"(rows must be seq_length + 1 = {int(seq_length) + 1} long); preprocess with "
                              f"--seq_length {seq_length} or set seq_length {self.seq_length}")


def _spill_dir() -> str:
    """A fresh directory for one dataset's rows, under $MFSFT_DATA_CACHE or the temporary directory."""
    root = os.environ.get("MFSFT_DATA_CACHE") or None
    if root:
        os.makedirs(root, exist_ok=True)
    return os.path.join(tempfile.mkdtemp(prefix="mfsft_online_", dir=root), "rows")


def _is_main_process() -> bool:
    """Rank 0 (or no launcher): msrun sets RANK_ID / MS_NODE_ID for each worker."""
    import os
    for key in ("RANK_ID", "MS_NODE_ID"):
        v = os.environ.get(key)
        if v is not None and v.strip().isdigit():
            return int(v) == 0
    return True


class OnlineSFTDataset(ArrayDataset):
    """Raw SFT data tokenized at load time. `tokenizer` is a Tokenizer or a path for load_tokenizer.

    Options are those of tools/preprocess.py (see pipeline.SFTOptions). After construction, ``stats`` holds
    the counts and ``rejects`` the first rejected records; ``rejects_file`` also gets all of them."""

    def __init__(self, files, tokenizer, template: str = "auto", seq_length: int = 2048, data_format: str = "auto",
                 map_keys=None, pack=False, train_on_prompt: bool = False, mask_history: bool = False,
                 truncation: str = DEFAULT_TRUNCATION, rejects_file: str = "", alpaca_prompt: str = "stanford",
                 pack_max_samples: Optional[int] = None, num_workers: int = 0, chunk_records: int = 512,
                 verbose: bool = True, enable_thinking: Optional[bool] = None):
        if isinstance(tokenizer, str):
            from ..tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.options = SFTOptions(seq_length=seq_length, template=template, data_format=data_format,
                                  map_keys=map_keys, alpaca_prompt=alpaca_prompt, train_on_prompt=train_on_prompt,
                                  mask_history=mask_history, truncation=truncation, pack=pack,
                                  pack_max_samples=pack_max_samples, num_workers=num_workers,
                                  chunk_records=chunk_records, enable_thinking=enable_thinking)
        self.stats = Stats()
        src = str(files)
        # tokenized rows are spilled to an on-disk row cache (a private temporary directory, removed with the
        # dataset) and read back by offset, so RAM does not grow with the data
        writer = RowCacheWriter(_spill_dir(), source=src)
        try:
            with RejectLog(rejects_file or None, self.stats) as log:
                for rows in iter_rows(files, tokenizer, self.options, self.stats, log):
                    for r in rows:
                        writer.add(r)
        except BaseException:
            writer.abort()
            raise
        self.rejects = log.items
        if not writer.rows:
            writer.abort()
            first = f"; first reject: {self.rejects[0]}" if self.rejects else ""
            raise DataError(f"{src}: no usable sample ({self.stats.line()}){first}")
        directory = writer.close()
        weakref.finalize(self, shutil.rmtree, os.path.dirname(directory), True)
        self.input_ids, self.labels, self.actual_seq_len, _ = open_cache(directory)
        self.source = src
        if verbose and _is_main_process():
            print(f"[data] {src}: {self.stats.line()} (truncation: {self.options.truncation})", flush=True)
            if self.stats.rejected and not rejects_file:
                logger.warning("%s: %d records rejected (set rejects_file to list them all); first: %s",
                               src, self.stats.rejected, self.rejects[0])


from .split import apply_split  # noqa: E402


def build_dataset(section: dict, tokenizer_path: str = "", seq_length: Optional[int] = None):
    """A dataset from the YAML train_dataset / eval_dataset section (config/schema.py DATASET)."""
    section = section or {}
    dl = section.get("data_loader") or {}
    kind = dl.get("type", "MindDataset")
    seq = section.get("seq_length") or seq_length
    if kind in ("HFDataLoader", "BlendedMegatronDatasetDataLoader"):
        from .hf_loader import build_hf_dataset, refuse_loader
        return build_hf_dataset(section, tokenizer_path, seq) if kind == "HFDataLoader" else refuse_loader(kind)
    path = dl.get("dataset_dir") or dl.get("data_files") or dl.get("path")
    if not path:
        raise ConfigError(f"train_dataset.data_loader.dataset_dir is empty; expected a "
                          f"{'MindRecord file or directory' if kind == 'MindDataset' else 'data file, glob or directory'}")
    if kind == "MindDataset":
        return apply_split(MindRecordDataset(path, seq_length=seq), dl.get("split"))
    if kind == "SFTDataLoader":
        if not seq:
            raise ConfigError("train_dataset: seq_length is not set (and model_config.seq_length is missing)")
        tok = dl.get("tokenizer") or tokenizer_path
        if not tok:
            raise ConfigError("train_dataset.data_loader.tokenizer is empty and processor.tokenizer gives no path")
        return apply_split(OnlineSFTDataset(
            path, tok, template=dl.get("template", "auto"), seq_length=int(seq),
            data_format=dl.get("data_format", "auto"), map_keys=dl.get("map_keys"), pack=dl.get("pack", False),
            train_on_prompt=bool(dl.get("train_on_prompt", False)), mask_history=bool(dl.get("mask_history", False)),
            truncation=dl.get("truncation") or DEFAULT_TRUNCATION, rejects_file=dl.get("rejects_file", ""),
            alpaca_prompt=dl.get("alpaca_prompt", "stanford"), pack_max_samples=dl.get("pack_max_samples"),
            num_workers=int(dl.get("num_workers", 0) or 0), enable_thinking=dl.get("enable_thinking")),
            dl.get("split"))
    raise ConfigError(f"train_dataset.data_loader.type {kind!r} is not supported; expected MindDataset (MindRecord) "
                      "or SFTDataLoader (raw json/jsonl/parquet/csv, tokenized online)")
