"""The basic-ops fallback of models/kernels.py (`MFSFT_CPU_KERNELS=0`), which the rest of the suite does not run.

`test_fallback_path_matches_references` re-runs a few cheap existing reference checks in a subprocess whose
environment has MFSFT_CPU_KERNELS=0 (so it is seen from the first import on): stories260K logits vs
transformers, one full fine-tuning step vs torch AdamW and one LoRA step vs peft, plus
`test_kernel_path_follows_env`, which makes sure that the subprocess really ran without the fused kernels.
"""
import os
import re
import subprocess
import sys

import numpy as np

from mindformers_sft.models import kernels
from mindformers_sft.pretrained import from_hf_dir
from mindformers_sft.trainer.optimizer import AdamW

from tests.paths import ROOT, STORIES

THIS = os.path.relpath(os.path.abspath(__file__), ROOT)
FALLBACK_NODES = [
    f"{THIS}::test_kernel_path_follows_env",
    "tests/models/test_llama_vs_hf.py::test_logits_match_hf[stories260K]",
    "tests/trainer/test_step_vs_torch.py::test_full_finetune_step_matches_torch_adamw",
    "tests/trainer/test_step_vs_torch.py::test_lora_steps_match_peft",
]


def test_kernel_path_follows_env():
    """MFSFT_CPU_KERNELS=0: no fused CPU kernel anywhere (model, loss, optimizer, completion signal).
    Otherwise the model and the optimizer use the kernels exactly when `cpu_kernels()` says they are available."""
    off = os.environ.get("MFSFT_CPU_KERNELS", "1") == "0"
    available = kernels.cpu_kernels()
    model = from_hf_dir(STORIES)
    opt = AdamW(model.trainable_params(), 0.9, 0.999, 1e-8, 0.0)
    assert opt.flat  # stories260K is small enough for the flat optimizer, whose update is a kernel when available
    if off:
        assert not available
        assert kernels.completion_signal() is None
        assert kernels._CPU_STATE["ops"] is None and kernels._CPU_STATE["error"] is None  # never even built
    assert model.cpu_kernel is available
    assert opt.fused is available
    # the model runs on whichever path was chosen
    ids = np.random.RandomState(0).randint(3, model.config.vocab_size, (1, 16)).astype(np.int32)
    from mindspore import Tensor
    assert np.isfinite(model.logits(Tensor(ids)).asnumpy()).all()


def test_fallback_path_matches_references():
    env = dict(os.environ, MFSFT_CPU_KERNELS="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FALLBACK_NODES],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(rf"\b{len(FALLBACK_NODES)} passed\b", summary), out[-4000:]
    assert not re.search(r"skipped|failed|error|deselected", summary, re.IGNORECASE), out[-4000:]
    assert "SKIPPED" not in out, out[-4000:]
