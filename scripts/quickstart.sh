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
# generation metrics on the held-out records (the last 10%, as the eval split): answers of the model vs references
HELDOUT=(--predict_data assets/data/alpaca_en_demo.json --predict_split 'train[90%:]' --predict_limit 32 --max_new_tokens 32)
echo "== BLEU-4 / ROUGE of the pretrained model's answers to 32 held-out instructions"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode predict "${HELDOUT[@]}" --output_dir "$OUT/base_predict"
echo "== LoRA fine-tuning"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode finetune --use_parallel False
echo "== BLEU-4 / ROUGE of the fine-tuned model's answers to the same held-out instructions"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode predict --load_checkpoint "$OUT/checkpoint" \
    "${HELDOUT[@]}" --output_dir "$OUT/predict_heldout"
.venv/bin/python -c "import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:]); \
print('held-out ROUGE-L', a['rouge-l'], '->', b['rouge-l'], '| ROUGE-1', a['rouge-1'], '->', b['rouge-1'], \
      '| BLEU-4', a['bleu-4'], '->', b['bleu-4'])" "$OUT/base_predict/predict_results.json" \
    "$OUT/predict_heldout/predict_results.json"
echo "== predict with the fine-tuned checkpoint ($OUT/checkpoint)"
.venv/bin/python run_mindformer.py --config "$CONFIG" --run_mode predict --load_checkpoint "$OUT/checkpoint" \
    --predict_data "Tell me a story about a cat." "Give three tips for staying healthy." --max_new_tokens 60
echo "== done: loss curve $OUT/loss_curve.png, TensorBoard logs $OUT/tensorboard, checkpoints $OUT/checkpoint/rank_0"
