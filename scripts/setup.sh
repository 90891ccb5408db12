#!/usr/bin/env bash
# Create ./.venv and install the suite into it.
#   bash scripts/setup.sh          product only (mindspore, tokenizers, ...)
#   bash scripts/setup.sh --test   plus the test/benchmark references (torch CPU, transformers 4.57, peft, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extra="[hf]"
if [ "${1:-}" = "--test" ]; then
  # torch==2.13.0 is pinned in the extras: the CPU wheel; an unpinned torch pulls a CUDA build.
  extra="[test,hf]"
fi
.venv/bin/python -m pip install -q -e ".${extra}"
.venv/bin/python - <<'PY'
import numpy, mindspore
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: MindSpore 2.10 needs numpy<2"
print(f"mindspore {mindspore.__version__}, numpy {numpy.__version__}: ready in .venv")
PY
