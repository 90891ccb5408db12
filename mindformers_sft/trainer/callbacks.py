"""What a user watches during training: a loss monitor (progress bar on a terminal, plain lines in a log),
TensorBoard scalars, and a loss-curve PNG at the end. Only rank 0 writes shared outputs."""
from __future__ import annotations

import json
import os
import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LossMonitor:
    """One line per `per_print_times` steps: step, epoch, loss, lr, grad norm, tokens/s, ETA."""

    def __init__(self, total_steps, per_print_times=1, stream=None, log_file=None, rank=0):
        self.total = total_steps
        self.every = max(1, int(per_print_times or 1))
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log = open(log_file, "a", encoding="utf-8") if log_file else None
        self.rank = rank
        self.t0 = time.time()
        self.first_step = None   # the step a (possibly resumed) run started from
        self.tokens = 0.0

    def on_step(self, step, epoch, loss, lr, grad_norm, tokens, skipped=False):
        if self.first_step is None:
            self.first_step = step - 1    # t0 stays at construction: the first step's compile time counts
        self.tokens += tokens
        done = step - self.first_step
        el = time.time() - self.t0
        tps = self.tokens / el if el > 0 else 0.0
        eta = el / done * (self.total - step) if done else 0.0
        line = (f"step {step}/{self.total} epoch {epoch} loss {loss:.6f} lr {lr:.3e} grad_norm {grad_norm:.4f} "
                f"tokens/s {tps:.0f} ETA {_fmt_time(eta)}" + (" (overflow, step skipped)" if skipped else ""))
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()
        if self.rank != 0 or (step % self.every and step != self.total):
            return
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        if self.rank == 0:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def close(self):
        if self.log:
            self.log.close()


class TensorBoard:
    def __init__(self, log_dir):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step, **values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class History:
    """Keeps every logged value in output_dir/loss_history.jsonl (appended across resumes) for the curve."""

    def __init__(self, path):
        self.path = path

    def add(self, **row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(l) for l in f if l.strip()]


def plot_loss_curve(history: History, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = history.rows()
    train = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}
    evals = {r["step"]: r["loss"] for r in rows if r.get("kind") == "eval"}
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(list(train), list(train.values()), label="train loss")
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
