#!/usr/bin/env bash
# Every benchmark of the README's table, one after another (run on a quiet machine: each is a ratio against its
# reference measured side by side, but a busy machine slows the two sides unequally). Logs go to bench/results/.
#
#     bash bench/run_all.sh            # all (about 30 minutes on 2 cores)
#     bash bench/run_all.sh generate   # the benches whose name contains "generate"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/results
mkdir -p "$OUT"

run() {   # run NAME ARGS...: log to bench/results/NAME.txt
  local name=$1
  shift
  if [ -n "${FILTER:-}" ] && [[ "$name" != *"$FILTER"* ]]; then return; fi
  echo "== $name: $PY $*"
  { echo "\$ $PY $*"; echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs"; "$PY" "$@" 2>&1 | grep -v '^\[WARNING\]'; } \
    > "$OUT/$name.txt"
  tail -n 6 "$OUT/$name.txt"
}

FILTER=${1:-}
run train_19m_full bench/bench_train.py --model 19m --mode full
run train_19m_lora bench/bench_train.py --model 19m --mode lora
run train_135m_full bench/bench_train.py --model 135m --mode full --steps 12
run train_135m_lora bench/bench_train.py --model 135m --mode lora
run memory_lora bench/bench_memory.py --model 19m --mode lora
run memory_lora_stories bench/bench_memory.py --model stories --mode lora
run preprocess bench/bench_preprocess.py --records 20000
run preprocess_distinct bench/bench_preprocess.py --records 999
run generate bench/bench_generate.py
run serve bench/bench_serve.py
run moe bench/bench_moe.py
run data_scale bench/bench_data_scale.py
run data_overlap bench/bench_data_scale.py --overlap
