#!/usr/bin/env bash
# Create ./.venv and install the suite into it.
#   bash scripts/setup.sh          product only (mindspore, tokenizers, ...)
#   bash scripts/setup.sh --test   plus the test/benchmark references (torch CPU, transformers 4.57, peft, pytest,
#                                  the openai client, playwright + Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extra="[hf,eval,serve]"
if [ "${1:-}" = "--test" ]; then
  # torch==2.13.0 is pinned in the extras: the CPU wheel; an unpinned torch pulls a CUDA build.
  extra="[test,hf,eval,serve]"
fi
.venv/bin/python -m pip install -q -e ".${extra}"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # the web chat page test drives Debian's chromium headless (playwright uses it; it downloads no browser)
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "error: the tests need Debian's chromium: sudo apt-get install -y chromium" >&2; exit 1
  fi
fi
.venv/bin/python - <<'PY'
import numpy, mindspore
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: MindSpore 2.10 needs numpy<2"
print(f"mindspore {mindspore.__version__}, numpy {numpy.__version__}: ready in .venv")
PY
