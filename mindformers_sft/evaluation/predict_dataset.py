"""`--run_mode predict --predict_data FILE`: generate an answer for every record of a dataset file (Alpaca,
ShareGPT or messages, read as training reads them) and score it against the record's reference answer.

Each record's last assistant turn is the label; the turns before it are rendered with the template the model
was fine-tuned with (generation/chat.py prompt_ids) and generated in batches (greedy by default; sampling with
--do_sample is seeded by `seed`, one generator per record). A prompt longer than the context (seq_length minus
max_new_tokens) keeps its last tokens and is counted. Writes OUTPUT/generated_predictions.jsonl (prompt, label,
prediction per record) and OUTPUT/predict_results.json (BLEU-4, ROUGE-1/2/L on 0-100; metrics.py).

    python run_mindformer.py --config ... --run_mode predict --load_checkpoint ... \
        --predict_data assets/data/alpaca_en_demo.json --predict_split 'train[90%:]' --predict_limit 32
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import ConfigError, DataError


def is_dataset_file(values) -> bool:
    """--predict_data names one existing data file (rather than prompt texts)."""
    from ..data.readers import EXTENSIONS
    return (isinstance(values, (list, tuple)) and len(values) == 1 and os.path.isfile(values[0])
            and os.path.splitext(values[0])[1].lower() in EXTENSIONS)


def _same_file(a, b) -> bool:
    try:
        return bool(b) and os.path.isfile(str(b)) and os.path.samefile(a, str(b))
    except OSError:
        return False


def read_examples(path: str, data_loader, split: Optional[str] = None, limit: Optional[int] = None,
                  log=print) -> list:
    """[(Conversation without its last answer, label text)] of the file, read as the config's SFTDataLoader
    reads its dataset (another file: format detected); `split` in HF slice syntax ('train[90%:]') over the readable records."""
    from ..data.formats import Conversation
    from ..data.pipeline import SFTOptions, iter_conversations
    from ..data.split import split_range
    from ..data.stats import RejectLog, Stats
    same = _same_file(path, data_loader.get("dataset_dir"))
    # the config's data_format / map_keys describe its own dataset file; any other file is detected (auto).
    # alpaca_prompt (how an Alpaca record became the user turn in training) applies to every Alpaca file.
    opts = SFTOptions(seq_length=1, data_format=(data_loader.get("data_format") if same else None) or "auto",
                      map_keys=data_loader.get("map_keys") if same else None,
                      alpaca_prompt=data_loader.get("alpaca_prompt") or "stanford")
    stats = Stats()
    rejects = RejectLog(stats=stats)
    convs = list(iter_conversations(path, opts, stats, rejects))
    if rejects.items:
        first = rejects.items[0]
        log(f"[predict] {stats.rejected} records of {path} cannot be used (first: {first['file']}:{first['line']} "
            f"{first['reason']})")
    if split:
        start, stop = split_range(split, len(convs), "--predict_split")
        convs = convs[start:stop]
    if limit:
        convs = convs[:int(limit)]
    if not convs:
        raise DataError(f"{path}: no usable record{' in split ' + split if split else ''}")
    return [(Conversation(turns=c.turns[:-1], system=c.system), c.turns[-1][1]) for _, c in convs]


def predict_file(path: str, model, tok, template, gen: dict, data_loader, output_dir: str, seed=None,
                 split: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 8,
                 max_context: Optional[int] = None, log=print) -> dict:
    from ..generation.chat import prompt_ids
    from .generation import GenerationSettings, generate_ids
    from .metrics import generation_metrics
    examples = read_examples(path, data_loader, split, limit, log)
    s = GenerationSettings(max_new_tokens=int(gen["max_new_tokens"]), do_sample=bool(gen["do_sample"]),
                           temperature=float(gen["temperature"] or 1.0), top_k=int(gen["top_k"] or 0),
                           top_p=float(gen["top_p"] or 1.0), seed=seed)
    mc = model.config
    context = int(max_context or mc.seq_length or mc.max_position_embedding or 2048)
    keep = context - s.max_new_tokens
    if keep < 1:
        raise ConfigError(f"max_new_tokens {s.max_new_tokens} leaves no room for a prompt in the context of "
                          f"{context} tokens (seq_length)")
    prompts, truncated = [], 0
    for conv, _ in examples:
        ids = prompt_ids(template, tok, conv.turns, system=conv.system)
        if len(ids) > keep:
            truncated += 1
            ids = ids[-keep:]
        prompts.append(ids)
    if truncated:
        log(f"[predict] {truncated} prompts longer than {keep} tokens (seq_length {context} - max_new_tokens "
            f"{s.max_new_tokens}) keep their last {keep} tokens")
    outs = generate_ids(model, prompts, s, list(mc.eos_token_ids), max_batch=batch_size)
    preds = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    labels = [label for _, label in examples]
    os.makedirs(output_dir, exist_ok=True)
    rows_path = os.path.join(output_dir, "generated_predictions.jsonl")
    with open(rows_path, "w", encoding="utf-8") as f:
        for ids, label, pred in zip(prompts, labels, preds):
            f.write(json.dumps({"prompt": tok.decode(ids, skip_special_tokens=False), "label": label,
                                "prediction": pred}, ensure_ascii=False) + "\n")
    metrics = generation_metrics(preds, labels)
    result = {**metrics, "samples": len(preds), "truncated_prompts": truncated, "max_new_tokens": s.max_new_tokens,
              "do_sample": s.do_sample, "data": path, "split": split}
    with open(os.path.join(output_dir, "predict_results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    log(f"[predict] {len(preds)} records of {path}{' ' + split if split else ''}: "
        + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f"; predictions in {rows_path}")
    return result
