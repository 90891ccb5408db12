"""Peak RSS per rank vs MindRecord size (issue 14 item 3), and step time with real data vs a fixed batch
(item 2, --overlap).

    .venv/bin/python bench/bench_data_scale.py [--rows 2000] [--seq 512] [--steps 4] [--out /tmp/bench_data_scale]
    .venv/bin/python bench/bench_data_scale.py --overlap [--rows 2000] [--steps 20]

Writes a MindRecord of N rows and one of 10N rows (MindFormers' schema, S+1 = seq+1 random tokens), trains the
stories260K model 2 ranks under msrun (scripts/msrun_launcher.sh, data_parallel 2) a few steps on each, and prints
each rank's peak RSS (ru_maxrss, recorded by the worker at exit) in one table. Target: 10N adds < 50 MB per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = "configs/stories260k/finetune_stories260k.yaml"


def write_mindrecord(path: str, rows: int, seq: int, vocab: int = 512, seed: int = 0) -> str:
    import numpy as np
    from mindformers_sft.data.mindrecord import MindRecordWriter
    rng = np.random.default_rng(seed)
    w = MindRecordWriter(path, packed=False, overwrite=True, batch_rows=500)
    for start in range(0, rows, 500):
        n = min(500, rows - start)
        ids = rng.integers(1, vocab, (n, seq + 1), dtype=np.int32)
        w.write({"input_ids": r, "labels": r} for r in ids)
    w.close()
    return path


def worker():
    """Inside msrun: run run_mindformer.py, then record this process's peak RSS."""
    import atexit
    import runpy
    out = os.environ["BENCH_RSS_DIR"]
    rank = os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or "0"

    def dump():
        with open(os.path.join(out, f"rss_rank_{rank}.json"), "w") as f:
            json.dump({"rank": int(rank), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
    atexit.register(dump)
    sys.argv = ["run_mindformer.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(ROOT, "run_mindformer.py"), run_name="__main__")


def _options(data: str, seq: int, steps: int):
    return ["runner_config.max_steps=%d" % steps, "context.mode=1", "do_eval=False",
            "eval_dataset.data_loader.dataset_dir=''", "train_dataset.data_loader.type=MindDataset",
            f"train_dataset.data_loader.dataset_dir={data}", f"train_dataset.seq_length={seq}",
            "runner_config.batch_size=2", "callbacks=[{type: MFLossMonitor}]"]


def run_msrun(data: str, seq: int, steps: int, out: str, port: int) -> list:
    rss_dir = os.path.join(out, "rss")
    os.makedirs(rss_dir, exist_ok=True)
    opts = _options(data, seq, steps) + ["parallel_config.data_parallel=2"]
    inner = (f"bench/bench_data_scale.py --config {CONFIG} --use_parallel True --output_dir {out}/run "
             "--options " + " ".join(f'"{o}"' for o in opts))
    env = dict(os.environ, BENCH_RSS_DIR=rss_dir)      # also marks the msrun workers
    r = subprocess.run(["bash", "scripts/msrun_launcher.sh", inner, "2", str(port), os.path.join(out, "log"), "True",
                        "300"], cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        d = os.path.join(out, "log")
        logs = "".join(open(os.path.join(d, f)).read()[-3000:] for f in sorted(os.listdir(d))) if os.path.isdir(d) \
            else r.stderr[-3000:]
        raise SystemExit(f"msrun failed on {data}:\n{r.stdout[-2000:]}\n{logs}")
    rows = []
    for k in range(2):
        with open(os.path.join(rss_dir, f"rss_rank_{k}.json")) as f:
            rows.append(json.load(f)["peak_rss_mb"])
    return rows


def scale(args):
    os.makedirs(args.out, exist_ok=True)
    res = []
    for mult in (1, 10):
        n = args.rows * mult
        path = os.path.join(args.out, f"data_{n}.mindrecord")
        if not os.path.exists(path + ".db"):
            write_mindrecord(path, n, args.seq)
        size_mb = sum(os.path.getsize(p) for p in (path, path + ".db")) / 2 ** 20
        t = time.time()
        rss = run_msrun(path, args.seq, args.steps, os.path.join(args.out, f"out_{n}"), 8140 + mult)
        res.append((n, size_mb, rss, time.time() - t))
    print(f"{'rows':>8} {'file MB':>9} {'rank0 peak RSS MB':>18} {'rank1 peak RSS MB':>18} {'wall s':>7}")
    for n, size_mb, rss, wall in res:
        print(f"{n:>8} {size_mb:>9.1f} {rss[0]:>18.1f} {rss[1]:>18.1f} {wall:>7.1f}")
    d = [b - a for a, b in zip(res[0][2], res[1][2])]
    print(f"10x file adds {d[0]:+.1f} MB (rank 0), {d[1]:+.1f} MB (rank 1) of peak RSS; target < 50 MB")


def overlap(args):
    """Step time on real data (MindRecordDataset + prefetch, as the trainer) vs the same step on one fixed batch.
    As in the trainer: compiled steps (jit) and ONE prefetcher for the run (its thread starts once per run, so a
    per-run cost is not counted as a per-step one); the timed blocks of the two alternate, to share the noise."""
    import numpy as np
    from mindformers_sft.data.dataset import MindRecordDataset
    from mindformers_sft.data.prefetch import Prefetcher
    from mindformers_sft.data.sampler import BatchPlan
    from mindformers_sft.config import load_config
    from mindformers_sft.build import build_model
    from mindformers_sft.trainer.optimizer import AdamW
    from mindformers_sft.trainer.step import TrainStep
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_{args.rows}.mindrecord")
    if not os.path.exists(path + ".db"):
        write_mindrecord(path, args.rows, args.seq)
    ds = MindRecordDataset(path, seq_length=args.seq)
    cfg = load_config(os.path.join(ROOT, CONFIG))
    model = build_model(cfg, log=lambda *a: None)
    opt = AdamW([p for p in model.trainable_params()], 0.9, 0.95, 1e-8, 0.0)
    step = TrainStep(model, opt, 1.0, None, jit=True)
    plan = BatchPlan(len(ds), args.batch, 1, seed=1)
    fixed = next(iter(Prefetcher(plan, ds, 0, 1)))[3]
    for _ in range(2):
        step(fixed, 1e-5)                                    # warm-up (compile)
    times = {"fixed": [], "data": []}
    batches = iter(Prefetcher(plan, ds, 0, args.reps * args.steps))
    for rep in range(args.reps):                            # interleaved, to share the machine's noise
        t = time.perf_counter()
        for _ in range(args.steps):
            step(fixed, 1e-5)
        times["fixed"].append((time.perf_counter() - t) / args.steps)
        t = time.perf_counter()
        for _ in range(args.steps):
            step(next(batches)[3], 1e-5)
        times["data"].append((time.perf_counter() - t) / args.steps)
    f, d = float(np.median(times["fixed"])), float(np.median(times["data"]))
    print(f"step on a fixed batch: {f * 1e3:.1f} ms; with real data (prefetch): {d * 1e3:.1f} ms; "
          f"overhead {100 * (d / f - 1):+.1f}% (target <= 3%)  [median of {args.reps} x {args.steps} steps, "
          f"batch {args.batch}, seq {args.seq}]")


def main():
    if os.environ.get("BENCH_RSS_DIR"):
        return worker()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="/tmp/bench_data_scale")
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    try:
        overlap(args) if args.overlap else scale(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
