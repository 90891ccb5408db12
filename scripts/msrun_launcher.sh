#!/usr/bin/env bash
# Launch a distributed job with MindSpore's msrun, with MindFormers' argument layouts:
#   bash scripts/msrun_launcher.sh "run_mindformer.py --config X.yaml --run_mode finetune"            (8 workers)
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM                                          (one node)
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK \
#        LOG_DIR JOIN CLUSTER_TIME_OUT                                                                 (multi-node)
# Defaults: 8 workers, 127.0.0.1:8118, logs in output/msrun_log (worker_N.log). On CPU msrun runs data
# parallel over the mccl backend; model/pipeline parallel need Ascend.
set -u
WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="False"
CLUSTER_TIME_OUT=7200

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

case $# in
  1) ;;
  2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
  6) WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6; LOG_DIR=$7; JOIN=$8
     CLUSTER_TIME_OUT=$9 ;;
  *) echo "error: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage >&2; exit 1 ;;
esac

for pair in "WORKER_NUM:$WORKER_NUM" "LOCAL_WORKER:$LOCAL_WORKER" "MASTER_PORT:$MASTER_PORT" \
            "NODE_RANK:$NODE_RANK" "CLUSTER_TIME_OUT:$CLUSTER_TIME_OUT"; do
  name=${pair%%:*}; value=${pair#*:}
  if ! [[ $value =~ ^[0-9]+$ ]]; then
    echo "error: $name=$value is not a number" >&2; exit 1
  fi
done
if [ "$WORKER_NUM" -le 1 ]; then
  echo "error: WORKER_NUM=$WORKER_NUM: a single worker needs no msrun; run it with plain python:" >&2
  echo "  python $1 --use_parallel False" >&2
  exit 1
fi
if [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "error: LOCAL_WORKER=$LOCAL_WORKER exceeds WORKER_NUM=$WORKER_NUM" >&2; exit 1
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# msrun starts the workers with the `python` on PATH: use the project's .venv when there is one
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
MSRUN=${MSRUN:-msrun}     # MSRUN="echo msrun" prints the command instead of running it
if ! command -v ${MSRUN%% *} >/dev/null 2>&1; then
  echo "error: msrun not found (it comes with the mindspore package); run bash scripts/setup.sh first" >&2
  exit 1
fi

cmd=($MSRUN "--worker_num=$WORKER_NUM" "--local_worker_num=$LOCAL_WORKER" "--master_addr=$MASTER_ADDR"
     "--master_port=$MASTER_PORT" "--node_rank=$NODE_RANK" "--log_dir=$LOG_DIR" "--join=$JOIN"
     "--cluster_time_out=$CLUSTER_TIME_OUT")
echo "Running: ${cmd[*]} $1"
case $LOG_DIR in /*) shown=$LOG_DIR ;; *) shown=$(pwd)/$LOG_DIR ;; esac
echo "Logs: $shown/worker_*.log"
# eval, as MindFormers' launcher: quotes inside EXECUTE_ORDER group arguments ("a=b c")
eval "${cmd[*]} $1"
