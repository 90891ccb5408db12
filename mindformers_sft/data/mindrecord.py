"""MindRecord files in MindFormers' schema, written with mindspore.mindrecord.FileWriter and read back whole.

Schema (as MindFormers' llama_preprocess.py ``--dataset_type qa``): ``input_ids`` and ``labels``, int32, shape
[-1], each row ``seq_length + 1`` long. Packed files add ``actual_seq_len`` (int32, fixed length per file; see
packing.py). ``file_partition`` P > 1 writes ``out.mindrecord0`` .. ``out.mindrecord{P-1}`` (FileWriter's shards).

Reading: MindRecord has no random access by row in mindspore's Python API, so :func:`read_mindrecord` loads all
rows of the files into numpy arrays when a dataset is opened (FileReader, one pass) -- fine for files that fit
in memory (a row of S = 4096 costs 32 KB).
"""
from __future__ import annotations

import glob
import os
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
