"""Evaluation beyond loss/perplexity: an lm-evaluation-harness backend (lm_eval_model, registered as
`mindformers_sft`), task runs for `--run_mode eval --tasks` (harness), generation metrics BLEU-4 / ROUGE
(metrics) and predictions over a dataset file (predict_dataset). lm-eval is imported only by the first two."""
