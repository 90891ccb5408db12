"""MindRecord files in MindFormers' schema, written with mindspore.mindrecord.FileWriter and read back whole.

Schema (as MindFormers' llama_preprocess.py ``--dataset_type qa``): ``input_ids`` and ``labels``, int32, shape
[-1], each row ``seq_length + 1`` long. Packed files add ``actual_seq_len`` (int32, fixed length per file; see
packing.py). ``file_partition`` P > 1 writes ``out.mindrecord0`` .. ``out.mindrecord{P-1}`` (FileWriter's shards).

Reading: MindRecord has no random access by row in mindspore's Python API (FileReader streams; MindPage looks
rows up by an indexed field, which MindFormers' schema lacks). So :func:`cache_mindrecord` streams the files once
(FileReader, one pass) into a fixed-width row cache (rowcache.py) keyed by the files' paths, sizes and times, and
training reads each needed row from it by offset: RAM per process does not depend on the dataset's size.
:func:`read_mindrecord` still loads everything into arrays (small files, tools).
"""
from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from typing import List, Optional, Tuple

import numpy as np

from ..errors import DataError

COLUMNS = ("input_ids", "labels")
PACKED_COLUMNS = COLUMNS + ("actual_seq_len",)


def output_files(path: str, file_partition: int = 1) -> List[str]:
    """The data files FileWriter makes for `path` with `file_partition` shards."""
    if int(file_partition) <= 1:
        return [path]
    return [f"{path}{i}" for i in range(int(file_partition))]


class MindRecordWriter:
    """Writes rows (dicts of int32 arrays) in batches; refuses to overwrite existing files unless told to."""

    def __init__(self, path: str, packed: bool, file_partition: int = 1, overwrite: bool = False,
                 batch_rows: int = 1000, desc: str = "qa"):
        from mindspore.mindrecord import FileWriter
        self.path = path
        self.files = output_files(path, file_partition)
        existing = [f for f in self.files + [f + ".db" for f in self.files] if os.path.exists(f)]
        if existing and not overwrite:
            raise DataError(f"{existing[0]}: output file already exists; remove it or choose another --output_file")
        for f in existing:
            os.remove(f)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self.columns = PACKED_COLUMNS if packed else COLUMNS
        self.writer = FileWriter(file_name=path, shard_num=max(1, int(file_partition)), overwrite=bool(overwrite))
        self.writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in self.columns}, desc)
        self.batch_rows = int(batch_rows)
        self._pending = []
        self.rows = 0

    def write(self, rows):
        for r in rows:
            self._pending.append({c: r[c] for c in self.columns})
            if len(self._pending) >= self.batch_rows:
                self._flush()

    def _flush(self):
        if self._pending:
            self.writer.write_raw_data(self._pending)
            self.rows += len(self._pending)
            self._pending = []

    def abort(self):
        """Drop what was written (after an error), so that a re-run does not meet a half-written file."""
        self._pending = []
        try:
            self.writer.commit()
        except Exception:                                    # best effort: the files go anyway
            pass
        for f in self.files:
            for g in (f, f + ".db"):
                if os.path.exists(g):
                    os.remove(g)

    def close(self) -> List[str]:
        self._flush()
        self.writer.commit()
        return self.files


def resolve_mindrecord(spec) -> Tuple[object, List[str]]:
    """(FileReader argument, files): a single file (all its shards), or the data files of a directory / glob."""
    if isinstance(spec, (list, tuple)):
        files = [str(s) for s in spec]
        return files, files
    spec = str(spec or "")
    if not spec:
        raise DataError("no MindRecord dataset given (dataset_dir is empty)")
    if os.path.isfile(spec):
        return spec, [spec]
    if os.path.isdir(spec):
        cands = sorted(os.path.join(spec, f) for f in os.listdir(spec))
    else:
        cands = sorted(glob.glob(spec))
    files = [f for f in cands if os.path.isfile(f) and not f.endswith(".db") and os.path.exists(f + ".db")]
    if not files:
        raise DataError(f"{spec}: no MindRecord files found (a MindRecord data file has a '.db' index beside it)")
    return files, files


def read_mindrecord(spec, columns: Optional[tuple] = None):
    """All rows as numpy arrays: dict column -> int32 array [N, len]; plus the files read.

    input_ids/labels rows are written straight into one preallocated array each (no per-row copies kept), so
    the peak memory is the dataset itself. Rows of one column must all have the same length (actual_seq_len
    rows are padded with their last value)."""
    from mindspore.mindrecord import FileReader
    arg, files = resolve_mindrecord(spec)
    try:
        reader = FileReader(arg, num_consumer=1)
    except Exception as e:                                  # mindspore raises RuntimeError / MRMOpenError
        raise DataError(f"{files[0]}: cannot open as MindRecord ({str(e).strip().splitlines()[0]})") from None
    try:
        schema = reader.schema()
        missing = [c for c in COLUMNS if c not in schema]
        if missing:
            raise DataError(f"{files[0]}: MindRecord has no column {missing[0]!r} (columns: {', '.join(schema)}); "
                            "expected MindFormers' input_ids/labels schema")
        cols = [c for c in (columns or PACKED_COLUMNS) if c in schema]
        n = reader.len()
        fixed = {}                                          # column -> preallocated [n, width]
        ragged = {c: [] for c in cols if c == "actual_seq_len"}
        count = 0
        for row in reader.get_next():
            for c in cols:
                r = np.asarray(row[c], dtype=np.int32).reshape(-1)
                if c in ragged:
                    ragged[c].append(r)
                    continue
                if c not in fixed:
                    fixed[c] = np.empty((n, len(r)), np.int32)
                if len(r) != fixed[c].shape[1]:
                    raise DataError(f"{files[0]}: column {c!r} has rows of different lengths "
                                    f"{sorted({fixed[c].shape[1], len(r)})} (row {count}); expected every row to be "
                                    "seq_length + 1 long")
                fixed[c][count] = r
            count += 1
    finally:
        reader.close()
    out = {c: a[:count] for c, a in fixed.items()}
    for c in cols:
        if c not in out and c not in ragged:
            out[c] = np.zeros((0, 0), np.int32)
    for c, rows in ragged.items():
        if not rows:
            out[c] = np.zeros((0, 0), np.int32)
            continue
        width = max(len(r) for r in rows)
        out[c] = np.stack([np.concatenate([r, np.full(width - len(r), r[-1] if len(r) else 0, np.int32)])
                           for r in rows])
    return out, files


def _check_files(files: List[str]):
    """Every data file and its .db index present, non-empty; names the first file that is not."""
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: MindRecord file is missing (a shard of {files[0]}?)")
        if not os.path.isfile(f + ".db"):
            raise DataError(f"{f}: cannot open as MindRecord (its index {f}.db is missing)")
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: MindRecord file is empty (truncated?)")


def _shards(files: List[str]) -> List[str]:
    """The data files FileReader will open: for a file written with shards, all its shards (named in .db)."""
    out = []
    for f in files:
        m = f[:-1] if f and f[-1].isdigit() else None
        sibs = sorted(g for g in glob.glob(glob.escape(m) + "[0-9]*") if not g.endswith(".db")) if m else []
        out.extend(sibs if len(sibs) > 1 and f in sibs else [f])
    return sorted(set(out), key=out.index)


def cache_key(files: List[str]) -> str:
    h = hashlib.sha1()
    for f in files:
        for g in (f, f + ".db"):
            st = os.stat(g)
            h.update(f"{os.path.abspath(g)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_root(first_file: str) -> str:
    """$MFSFT_DATA_CACHE, else a hidden .mfsft_rows directory beside the data, else the temp directory."""
    env = os.environ.get("MFSFT_DATA_CACHE")
    if env:
        return env
    d = os.path.join(os.path.dirname(os.path.abspath(first_file)), ".mfsft_rows")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), "mfsft_rows")


def _stream_rows(arg, columns):
    """Rows in file order through MindSpore's MindDataset with a one-row prefetch: its memory stays a few MB
    however large the file (FileReader.get_next buffers pages and peaked above the data's size in our test)."""
    import mindspore.dataset as mds
    prefetch = mds.config.get_prefetch_size()
    mds.config.set_prefetch_size(1)
    try:
        d = mds.MindDataset(arg, columns_list=list(columns), shuffle=False, num_parallel_workers=1)
        for row in d.create_dict_iterator(output_numpy=True, num_epochs=1):
            yield row
    finally:
        mds.config.set_prefetch_size(prefetch)


def cache_mindrecord(spec, cache_dir: Optional[str] = None):
    """(input_ids, labels, actual_seq_len or None, files) as on-disk row arrays (rowcache.RowFile): the files are
    streamed once into the cache (RAM bounded by one row), later opens reuse it."""
    import mindspore.dataset as mds
    from .rowcache import RowCacheWriter, open_cache
    arg, files = resolve_mindrecord(spec)
    all_files = _shards(files)
    _check_files(all_files)
    directory = os.path.join(cache_dir or cache_root(files[0]), cache_key(all_files))
    got = open_cache(directory)
    if got is None:
        try:
            # not FileReader: opening one starts its readers, which buffer more than the file's size
            probe = mds.MindDataset(arg, shuffle=False, num_parallel_workers=1)
            schema, n = probe.get_col_names(), probe.get_dataset_size()
        except Exception as e:                              # mindspore raises RuntimeError / MRMOpenError
            raise DataError(f"{files[0]}: cannot open as MindRecord ({str(e).strip().splitlines()[0]}); a shard "
                            f"missing or truncated? (files: {', '.join(all_files)})") from None
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        writer = RowCacheWriter(directory, source=files[0])
        try:
            missing = [c for c in COLUMNS if c not in schema]
            if missing:
                raise DataError(f"{files[0]}: MindRecord has no column {missing[0]!r} (columns: "
                                f"{', '.join(schema)}); expected MindFormers' input_ids/labels schema")
            for row in _stream_rows(arg, [c for c in PACKED_COLUMNS if c in schema]):
                writer.add(row)
            if writer.rows != n:
                raise DataError(f"{files[0]}: read {writer.rows} rows of the {n} its index lists (truncated?)")
        except DataError:
            writer.abort()
            raise
        except Exception as e:
            writer.abort()
            raise DataError(f"{files[0]}: cannot read MindRecord rows ({str(e).strip().splitlines()[0]}); a shard "
                            f"truncated? (files: {', '.join(all_files)})") from None
        got = open_cache(writer.close())
    ids, lab, asl, _ = got
    return ids, lab, asl, files
