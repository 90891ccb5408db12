"""Issue 14: MindRecord rows are read from an on-disk row cache, not held in RAM; the data order (resume, shuffle)
is unchanged; bad shards / schemas / too little data fail before training with the file named."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mindformers_sft.data.dataset import MindRecordDataset
from mindformers_sft.data.prefetch import Prefetcher
from mindformers_sft.data.sampler import BatchPlan
from mindformers_sft.errors import ConfigError, DataError
from tests.paths import ROOT

SEQ = 63


def _write(path, n, seed=0, shards=1, schema=None):
    from mindspore.mindrecord import FileWriter
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 500, (n, SEQ + 1), dtype=np.int32)
    w = FileWriter(str(path), shard_num=shards, overwrite=True)
    cols = schema or ("input_ids", "labels")
    w.add_schema({c: {"type": "int32", "shape": [-1]} for c in cols}, "test")
    for a in range(0, n, 1000):
        w.write_raw_data([{c: r for c in cols} for r in ids[a:a + 1000]])
    w.commit()
    return ids


def test_rows_equal_mindspore_reader_and_resume_and_shuffle(tmp_path):
    """Rows equal mindspore's own FileReader's; the BatchPlan order (with prefetch) is a function of the seed."""
    from mindspore.mindrecord import FileReader
    path = tmp_path / "d.mindrecord"
    _write(path, 50, shards=1)
    ds = MindRecordDataset(str(path), seq_length=SEQ, cache_dir=str(tmp_path / "cache"))
    ref = [r["input_ids"] for r in FileReader(str(path)).get_next()]
    assert len(ds) == len(ref) == 50
    for i in (0, 7, 49, -1):
        np.testing.assert_array_equal(ds[i]["input_ids"], ref[i])
    # a second open reuses the cache (same rows)
    again = MindRecordDataset(str(path), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.input_ids[10:20], np.stack(ref[10:20]))
    # per-epoch shuffle reproducible from the seed; resume at step k reads what an uninterrupted run read
    plan = BatchPlan(len(ds), 2, accumulation=2, dp_size=2, dp_rank=1, seed=7)
    full = [idx for _, _, idx, _ in Prefetcher(plan, ds, 0, 9)]
    resumed = [idx for _, _, idx, _ in Prefetcher(plan, ds, 4, 9)]
    assert resumed == full[4:]
    perm = np.random.default_rng([7, 1]).permutation(50)       # epoch 1 (steps 6..), rank 1's slice
    assert sum(full[6], []) == perm[4:8].tolist()
    batch = next(iter(Prefetcher(plan, ds, 6, 7)))[3][0]
    np.testing.assert_array_equal(batch["input_ids"], np.stack([ref[i] for i in perm[4:6]]))


def test_sharded_file_and_bad_inputs_name_the_file(tmp_path):
    path = tmp_path / "s.mindrecord"
    ids = _write(path, 40, shards=2)
    ds = MindRecordDataset(str(tmp_path / "s.mindrecord0"), cache_dir=str(tmp_path / "c"))
    assert len(ds) == 40 and sorted(map(tuple, np.asarray(ds.input_ids))) == sorted(map(tuple, ids))
    # fewer samples than ranks x batch -> an error before any step
    with pytest.raises(ConfigError, match="has 40 samples, fewer than one global batch"):
        BatchPlan(len(ds), 8, 1, dp_size=8)
    # a truncated shard
    shard = tmp_path / "s.mindrecord1"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 3])
    with pytest.raises(DataError, match=r"s\.mindrecord"):
        MindRecordDataset(str(tmp_path / "s.mindrecord0"), cache_dir=str(tmp_path / "c2"))
    # a missing shard
    shard.unlink()
    with pytest.raises(DataError, match=r"s\.mindrecord"):
        MindRecordDataset(str(tmp_path / "s.mindrecord0"), cache_dir=str(tmp_path / "c3"))
    # a schema that is not MindFormers'
    other = tmp_path / "o.mindrecord"
    _write(other, 5, schema=("tokens", "mask"))
    with pytest.raises(DataError, match=r"o\.mindrecord: MindRecord has no column 'input_ids'"):
        MindRecordDataset(str(other), cache_dir=str(tmp_path / "c4"))


_RSS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from mindformers_sft.data.dataset import MindRecordDataset
    from mindformers_sft.data.mindrecord import read_mindrecord
    from mindformers_sft.data.sampler import BatchPlan
    from mindspore.mindrecord import FileReader            # imported before the peak is reset

    def hwm():
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
    open("/proc/self/clear_refs", "w").write("5")          # reset the peak after the imports
    base = hwm()
    if sys.argv[3] == "whole":                              # the old way: every row in RAM
        rows = read_mindrecord(sys.argv[1])
    else:
        ds = MindRecordDataset(sys.argv[1], cache_dir=sys.argv[2])
        plan = BatchPlan(len(ds), 4, seed=0)
        for step in range(plan.steps_per_epoch):            # one whole epoch, every row read
            for idx in plan.micro_batches(0, step):
                s = [ds[i] for i in idx]
    print(hwm() - base)
""")


def test_peak_rss_does_not_grow_with_the_dataset(tmp_path):
    peaks = {}
    for n in (2000, 20000):                                 # 1 MB and 10 MB of rows per column
        path = tmp_path / f"d{n}.mindrecord"
        _write(path, n, seed=n)
        for how in ("whole", "cache"):
            r = subprocess.run([sys.executable, "-c", _RSS.format(root=ROOT), str(path), str(tmp_path / "c"), how],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            peaks[n, how] = float(r.stdout.strip().splitlines()[-1])
    # the measure sees rows held in RAM: 18 MB more rows (2 columns) raise the whole-file reader's peak
    assert peaks[20000, "whole"] - peaks[2000, "whole"] > 15.0, peaks
    # the row cache (built, then one epoch read) does not grow with the file
    assert peaks[20000, "cache"] - peaks[2000, "cache"] < 4.0, peaks
    assert peaks[20000, "cache"] < 20.0, peaks
