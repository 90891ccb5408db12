"""Streaming, atomic checkpoint I/O: format compatibility with MindSpore/safetensors/torch, sharding, verify."""
import json
import os
import stat

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as torch_load_file

from mindformers_sft.checkpoint import (BF16, HF_INDEX_NAME, HF_WEIGHTS_NAME, MANIFEST_SUFFIX, CkptWriter,
                                        SafetensorsWriter, ckpt_infos, iter_ckpt, iter_safetensors, iter_tensors,
                                        load_tensors, parse_size, save_ckpt, save_safetensors,
                                        save_safetensors_sharded, tensor_infos, verify)
from mindformers_sft.checkpoint import ckpt_io as ckio
from mindformers_sft.errors import CheckpointError, ConfigError


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w.f32": rng.standard_normal((6, 5)).astype(np.float32),
        "w.bf16": rng.standard_normal((4, 3)).astype(np.float32).astype(BF16),
        "w.f16": rng.standard_normal((7,)).astype(np.float16),
        "w.i32": np.arange(12, dtype=np.int32).reshape(3, 4),
        "w.scalar": np.asarray(np.float32(2.5)),
    }


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _listing(d):
    return sorted(os.listdir(d))


# ------------------------------------------------------------------------------------------ MindSpore CKPT
def test_ckpt_writer_bytes_equal_mindspore_save_checkpoint(tmp_path):
    t = _tensors()
    ours = save_ckpt(t, str(tmp_path / "ours.ckpt"))
    ref = str(tmp_path / "ref.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in t.items()], ref)
    assert open(ours, "rb").read() == open(ref, "rb").read()
    loaded = ms.load_checkpoint(ours)
    assert list(loaded) == list(t)
    assert loaded["w.bf16"].dtype == ms.bfloat16
    for k, v in t.items():
        assert _same(loaded[k].asnumpy(), v), k


def test_iter_ckpt_reads_mindspore_files_with_crc_and_extras(tmp_path):
    t = _tensors(1)
    ref = str(tmp_path / "ref.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in t.items()], ref,
                       append_dict={"note": "a string entry", "epoch_num": 3}, crc_check=True)
    got = dict(iter_ckpt(ref))
    assert "note" not in got                       # string entries are skipped
    assert int(got["epoch_num"]) == 3
    for k, v in t.items():
        assert _same(got[k], v), k
    assert list(ckpt_infos(ref))[:len(t)] == list(t)
    verify(ref, deep=True)                         # crc trailer checked


def test_ckpt_large_tensor_split_in_slices_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(ckio, "CKPT_SLICE_BYTES", 40)   # force MindSpore-style multi-record tensors
    t = {"big": np.arange(50, dtype=np.float32).reshape(5, 10), "small": np.ones(3, np.float32)}
    p = save_ckpt(t, str(tmp_path / "s.ckpt"))
    raw = open(p, "rb").read()
    assert raw.count(b"big") == 5                    # 200 bytes / 40 -> 5 records with the same tag
    for k, v in ms.load_checkpoint(p).items():
        assert _same(v.asnumpy(), t[k])
    for k, v in iter_ckpt(p):
        assert _same(v, t[k])


# ------------------------------------------------------------------------------------------ safetensors
def test_safetensors_spec_and_spooled_writes_are_identical_and_readable_everywhere(tmp_path):
    t = _tensors(2)
    a = save_safetensors(t, str(tmp_path / "a.safetensors"), {"format": "ms"})           # header first
    b = save_safetensors(iter(list(t.items())), str(tmp_path / "b.safetensors"), {"format": "ms"})  # spooled
    assert open(a, "rb").read() == open(b, "rb").read()
    assert _listing(tmp_path) == ["a.safetensors", "b.safetensors"]   # no temp/spool files left
    # our reader, safetensors' numpy loader, torch loader, MindSpore's loader
    got = dict(iter_safetensors(a))
    npd = np_load_file(a)
    ptd = torch_load_file(a)
    msd = ms.load_checkpoint(a, format="safetensors")
    for k, v in t.items():
        assert _same(got[k], v) and _same(npd[k], v), k
        assert _same(msd[k].asnumpy(), v), k
    assert ptd["w.bf16"].dtype == torch.bfloat16
    assert np.array_equal(ptd["w.bf16"].view(torch.int16).numpy().view(np.uint16), t["w.bf16"].view(np.uint16))


def test_safetensors_reader_reopens_handle_and_filters(tmp_path):
    t = {f"t{i}": np.full((100,), i, np.float32) for i in range(6)}
    p = save_safetensors(t, str(tmp_path / "x.safetensors"))
    got = list(iter_safetensors(p, reopen_bytes=500))     # reopen after every tensor or so
    assert [k for k, _ in got] == list(t)
    assert all(_same(v, t[k]) for k, v in got)
    assert [k for k, _ in iter_safetensors(p, names=["t4", "t1"])] == ["t1", "t4"]
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        list(iter_safetensors(p, names=["nope"]))


def test_spec_writer_rejects_wrong_shape_and_missing_tensor(tmp_path):
    p = str(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'a' is float32\\[3\\], expected float32\\[4\\]"):
        with SafetensorsWriter(p, spec=[("a", np.float32, (4,))]) as w:
            w.add("a", np.zeros(3, np.float32))
    w = SafetensorsWriter(p, spec=[("a", np.float32, (4,)), ("b", np.float32, (2,))])
    w.add("a", np.zeros(4, np.float32))
    with pytest.raises(CheckpointError, match="never written, e.g. 'b'"):
        w.close()
    assert _listing(tmp_path) == []


def test_writers_are_atomic_old_file_survives_a_failed_write(tmp_path):
    for ext, save in (("ckpt", save_ckpt), ("safetensors", save_safetensors)):
        p = str(tmp_path / f"m.{ext}")
        save({"a": np.ones(4, np.float32)}, p)
        before = open(p, "rb").read()

        def gen():
            yield "a", np.zeros(4, np.float32)
            raise RuntimeError("disk on fire")
        with pytest.raises(RuntimeError):
            save(gen(), p)
        assert open(p, "rb").read() == before
        mask = os.umask(0o022)
        os.umask(mask)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask     # not mkstemp's 0600
    assert _listing(tmp_path) == ["m.ckpt", "m.ckpt" + MANIFEST_SUFFIX, "m.safetensors"]


# ------------------------------------------------------------------------------------------ sharded HF
def test_sharded_writer_shards_index_and_single_file(tmp_path):
    rng = np.random.default_rng(3)
    t = {f"layer.{i}.w": rng.standard_normal((25,)).astype(np.float32) for i in range(10)}   # 100 B each
    t["huge"] = rng.standard_normal((100,)).astype(np.float32)                               # 400 B > max
    d = str(tmp_path / "hf")
    for tensors in (t, iter(list(t.items()))):                  # planned (dict) and streamed (iterator)
        res = save_safetensors_sharded(tensors, d, max_shard_size=250)
        names = _listing(d)
        assert HF_INDEX_NAME in names and HF_WEIGHTS_NAME not in names
        shards = [n for n in names if n.endswith(".safetensors")]
        assert len(shards) == 6 and all(n.endswith(f"-of-{6:05d}.safetensors") for n in shards)
        for s in shards:
            assert os.path.getsize(os.path.join(d, s)) < 250 + 400 + 200
        idx = json.load(open(os.path.join(d, HF_INDEX_NAME)))
        assert idx["metadata"]["total_size"] == sum(v.nbytes for v in t.values()) == res["total_size"]
        assert set(idx["weight_map"]) == set(t)
        assert len(set(idx["weight_map"].values())) == 6
        got = load_tensors(d)
        assert set(got) == set(t) and all(_same(got[k], v) for k, v in t.items())
        assert len(verify(d)) == len(t)
    # everything fits: one model.safetensors, the old shards and index are removed
    save_safetensors_sharded(t, d, max_shard_size="10MB")
    assert _listing(d) == [HF_WEIGHTS_NAME]
    assert all(_same(v, t[k]) for k, v in iter_tensors(d))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9
    assert parse_size("10MB") == 10 ** 7
    assert parse_size("10mb") == 10 ** 7
    assert parse_size("512MiB") == 512 * 2 ** 20
    assert parse_size("1.5KB") == 1500
    assert parse_size("2048") == 2048 and parse_size(7) == 7
    for bad in ("ten MB", "5XB", "0", "-3MB"):
        with pytest.raises(ConfigError, match="max_shard_size"):
            parse_size(bad)


# ------------------------------------------------------------------------------------------ verify
def test_verify_detects_truncated_safetensors(tmp_path):
    p = save_safetensors(_tensors(4), str(tmp_path / "m.safetensors"))
    assert set(verify(p)) == set(_tensors(4))
    data = open(p, "rb").read()
    for cut in (len(data) - 7, 40, 5, 0):
        open(p, "wb").write(data[:cut])
        with pytest.raises(CheckpointError, match="m.safetensors"):
            verify(p)


def test_verify_detects_truncated_ckpt_anywhere(tmp_path):
    t = _tensors(5)
    p = save_ckpt(t, str(tmp_path / "m.ckpt"))
    assert set(verify(p, deep=True)) == set(t)
    data = open(p, "rb").read()
    # every cut point: inside a record (structure) or exactly between records (manifest size/count)
    for cut in range(0, len(data)):
        open(p, "wb").write(data[:cut])
        with pytest.raises(CheckpointError, match="m.ckpt"):
            verify(p)
    # without a manifest, a cut inside a record is still caught, naming the tensor being read
    os.unlink(p + MANIFEST_SUFFIX)
    open(p, "wb").write(data[:len(data) - 5])
    with pytest.raises(CheckpointError, match="m.ckpt.*(truncated|tensor 'w.scalar')"):
        verify(p)


def test_verify_deep_detects_bit_flip_and_missing_shard(tmp_path):
    p = save_ckpt({"a": np.arange(64, dtype=np.float32)}, str(tmp_path / "m.ckpt"))
    data = bytearray(open(p, "rb").read())
    data[-10] ^= 0x01                                  # same size, one flipped bit in the data
    open(p, "wb").write(bytes(data))
    verify(p)                                          # structure still fine
    with pytest.raises(CheckpointError, match="m.ckpt: sha256"):
        verify(p, deep=True)
    d = str(tmp_path / "hf")
    save_safetensors_sharded({f"w{i}": np.zeros(100, np.float32) for i in range(4)}, d, max_shard_size=500)
    os.unlink(os.path.join(d, "model-00002-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors.*does not exist"):
        verify(d)


def test_tensor_infos_of_a_directory_reports_duplicates(tmp_path):
    save_safetensors({"a": np.zeros(2, np.float32)}, str(tmp_path / "x1.safetensors"))
    save_safetensors({"a": np.zeros(2, np.float32)}, str(tmp_path / "x2.safetensors"))
    with pytest.raises(CheckpointError, match="x2.safetensors: tensor 'a' is also in .*x1.safetensors"):
        tensor_infos(str(tmp_path))


def test_ckpt_writer_rejects_duplicates_and_unsupported_dtype(tmp_path):
    p = str(tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="tensor 'a' written twice"):
        with CkptWriter(p) as w:
            w.add("a", np.zeros(2, np.float32))
            w.add("a", np.zeros(2, np.float32))
    with pytest.raises(CheckpointError, match="tensor 'c': dtype complex64"):
        save_ckpt({"c": np.zeros(2, np.complex64)}, p)
    assert _listing(tmp_path) == []
