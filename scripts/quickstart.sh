#!/usr/bin/env bash
# The main job, on CPU in a few minutes: set up .venv, LoRA-fine-tune the bundled pretrained stories260K
# Llama on the bundled Alpaca demo data (held-out loss printed before and after), then chat with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=configs/stories260k/lora_stories260k.yaml
OUT=output/stories260k_lora
rm -rf "$OUT"
echo "== held-out loss of the pretrained model"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode eval --output_dir "$OUT/base_eval"
echo "== LoRA fine-tuning"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode finetune --use_parallel False
echo "== predict with the fine-tuned checkpoint ($OUT/checkpoint)"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode predict --load_checkpoint "$OUT/checkpoint" \
    --predict_data "Tell me a story about a cat." "Give three tips for staying healthy." --max_new_tokens 60
echo "== done: loss curve $OUT/loss_curve.png, TensorBoard logs $OUT/tensorboard, checkpoints $OUT/checkpoint/rank_0"
