"""MindFormers 1.6+ YAMLs (use_legacy: False): MindFormers' own files (verbatim copies in fixtures/mindformers/) parse;
configs/qwen3/finetune_qwen3.yaml differs from MindFormers' only in paths, sizes and device; new model_config
names translate; Ascend-only knobs are listed once as having no effect; typos name the closest key."""
import os

import pytest
import yaml

from mindformers_sft.config import load_config, no_effect_lines
from mindformers_sft.errors import ConfigError
from tests.paths import ROOT, STORIES

MF = os.path.join(os.path.dirname(__file__), "fixtures", "mindformers")
OURS = os.path.join(ROOT, "configs", "qwen3", "finetune_qwen3.yaml")
TINY = os.path.join(ROOT, "configs", "qwen3", "finetune_qwen3_tiny.yaml")
# what a user changes to run MindFormers' file here: paths, sizes, device and parallel layout
ALLOWED = {"use_parallel", "pretrained_model_dir", "output_dir", "train_dataset.data_loader.path",
           "train_dataset.data_loader.handler[0].n", "train_dataset.data_loader.handler[1].seq_length",
           "train_dataset.data_loader.handler[2].seq_length", "train_dataset.num_parallel_workers",
           "context.device_target", "parallel_config.model_parallel", "parallel_config.pipeline_stage",
           "parallel_config.micro_batch_num", "callbacks[1].save_checkpoint_steps"}


def flat(v, prefix=""):
    if isinstance(v, dict):
        return {k: x for key, sub in v.items() for k, x in flat(sub, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return {k: x for i, sub in enumerate(v) for k, x in flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: v}


def read(path):
    with open(path, encoding="utf-8") as f:
        return flat(yaml.safe_load(f))


@pytest.mark.parametrize("ours", [OURS, TINY])
def test_ours_differs_from_mindformers_only_in_paths_sizes_and_device(ours):
    mf, mine = read(os.path.join(MF, "finetune_qwen3.yaml")), read(ours)
    assert set(mf) == set(mine)                      # every key of MindFormers' file, and no other
    changed = {k.replace("train_dataset_task.dataset_config.", "train_dataset.") for k in mf if mf[k] != mine[k]}
    assert changed <= ALLOWED, changed - ALLOWED
    assert mine["use_legacy"] is False and mine["train_dataset.data_loader.type"] == "HFDataLoader"


@pytest.mark.parametrize("name", ["finetune_qwen3.yaml", "pretrain_qwen3_30b_a3b_4k.yaml", "predict_qwen3_moe.yaml"])
def test_mindformers_yamls_parse(name):
    cfg = load_config(os.path.join(MF, name))
    assert cfg.use_legacy is False
    assert cfg.load_ckpt_format == "safetensors"
    mc = cfg.model.model_config
    assert mc["param_init_type"] in ("float32", "bfloat16") and "params_dtype" not in mc
    assert mc["layernorm_compute_type"] == "float32" and mc["softmax_compute_type"] == "float32"


def test_new_model_config_names_translate():
    cfg = load_config(os.path.join(MF, "finetune_qwen3.yaml"))
    mc = cfg.model.model_config
    raw = yaml.safe_load(open(os.path.join(MF, "finetune_qwen3.yaml")))["model"]["model_config"]
    assert mc["tie_word_embeddings"] is (not raw["untie_embeddings_and_output_weights"])
    assert mc["param_init_type"] == raw["params_dtype"] and mc["compute_dtype"] == raw["compute_dtype"]
    assert mc["rotary_dtype"] == raw["rotary_dtype"]
    moe = load_config(os.path.join(MF, "pretrain_qwen3_30b_a3b_4k.yaml")).model.model_config
    raw = yaml.safe_load(open(os.path.join(MF, "pretrain_qwen3_30b_a3b_4k.yaml")))["model"]["model_config"]
    assert (moe["num_layers"], moe["num_heads"], moe["n_kv_heads"], moe["theta"], moe["max_position_embedding"]) == (
        raw["num_hidden_layers"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["rope_theta"],
        raw["max_position_embeddings"])


def test_ascend_only_knobs_listed_as_no_effect_on_cpu():
    cfg = load_config(os.path.join(MF, "finetune_qwen3.yaml"))
    lines = no_effect_lines(cfg, "CPU")
    text = lines[0]
    for key in ("context.ascend_config.parallel_speed_up_json_path", "context.ascend_config.precision_mode",
                "context.max_device_memory", "parallel.enable_alltoall", "recompute_config.mp_comm_recompute",
                "context.jit_config.jit_level"):
        assert key in text, key
    assert "context.mode" not in text and "parallel.dataset_strategy" not in text   # these are acted on
    ascend = no_effect_lines(cfg, "Ascend")[0]        # what this suite does not pass on, even on Ascend
    assert "context.ascend_config.precision_mode" in ascend and "recompute_config.mp_comm_recompute" in ascend
    assert "parallel.enable_alltoall" not in ascend and "context.max_device_memory" not in ascend


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_unknown_keys_name_the_closest(tmp_path):
    base = open(os.path.join(MF, "finetune_qwen3.yaml")).read()
    with pytest.raises(ConfigError, match=r"c.yaml:11: unknown key 'use_legasy'; did you mean 'use_legacy'"):
        load_config(write(tmp_path, base.replace("use_legacy:", "use_legasy:")))
    with pytest.raises(ConfigError, match=r"unknown handler 'AlpacaInstructHandler'; did you mean "
                                          r"'AlpacaInstructDataHandler'"):
        load_config(write(tmp_path, base.replace("type: AlpacaInstructDataHandler", "type: AlpacaInstructHandler")))
    with pytest.raises(ConfigError, match=r"unknown key .*handler\[2\]\.pack_strategyy' for PackingHandler; did you "
                                          r"mean 'pack_strategy'"):
        load_config(write(tmp_path, base.replace("pack_strategy:", "pack_strategyy:")))
    with pytest.raises(ConfigError, match=r"c.yaml:16: unknown key 'trainer.tpe'; did you mean 'type'"):
        load_config(write(tmp_path, base.replace("  type: CausalLanguageModelingTrainer", "  tpe: x")))
    with pytest.raises(ConfigError, match=r"load_ckpt_format: 'safetensor' .*did you mean 'safetensors'"):
        load_config(write(tmp_path, base.replace("load_ckpt_format: 'safetensors'", "load_ckpt_format: safetensor")))
    with pytest.raises(ConfigError, match=r"c.yaml:109: unknown key 'parallel.enable_alltoal'; did you mean "
                                          r"'enable_alltoall'"):
        load_config(write(tmp_path, base.replace("enable_alltoall:", "enable_alltoal:")))
    with pytest.raises(ConfigError, match=r"dataset_strategy has 3 entries but train_dataset.input_columns has 4"):
        load_config(write(tmp_path, base.replace("      [*dp, 1],\n      [*dp, 1]\n", "      [*dp, 1]\n")))


def test_hf_loader_passes_unknown_keys_to_datasets(tmp_path):
    base = open(os.path.join(MF, "finetune_qwen3.yaml")).read()
    cfg = load_config(write(tmp_path, base.replace('    split: "train"', '    split: "train"\n    data_files: x.json')))
    assert cfg.train_dataset.data_loader.data_files == "x.json"
    assert cfg.train_dataset_task.dataset_config.data_loader.type == "HFDataLoader"


def test_unsupported_values_are_refused(tmp_path):
    base = open(os.path.join(MF, "finetune_qwen3.yaml")).read()
    with pytest.raises(ConfigError, match=r"hidden_dropout: 0.1 is not supported here; this decoder implements "
                                          r"hidden_dropout: 0.0"):
        load_config(write(tmp_path, base.replace("hidden_dropout: 0.0", "hidden_dropout: 0.1")))


def test_legacy_keeps_todays_config(tmp_path):
    """use_legacy True (or absent): the config is left as written (no translation, no pretrained_model_dir)."""
    text = "model:\n  model_config:\n    params_dtype: float32\n    untie_embeddings_and_output_weights: True\n"
    for head in ("", "use_legacy: True\n"):
        cfg = load_config(write(tmp_path, head + text))
        assert dict(cfg.model.model_config) == {"params_dtype": "float32", "untie_embeddings_and_output_weights": True}
        assert cfg.use_legacy is True and cfg.pretrained_model_dir == ""
    cfg = load_config(write(tmp_path, "use_legacy: False\n" + text))
    assert cfg.model.model_config == {"param_init_type": "float32", "tie_word_embeddings": False}


def test_dataset_task_config_stands_for_train_dataset(tmp_path):
    p = write(tmp_path, "train_dataset_task:\n  type: CausalLanguageModelDataset\n  dataset_config:\n"
                        "    data_loader: {type: HFDataLoader, path: json, data_files: a.json}\n    seq_length: 64\n")
    assert load_config(p).train_dataset.data_loader.data_files == "a.json"
    with pytest.raises(ConfigError, match="unknown key 'train_dataset_task.dataset_confg'; did you mean "
                                          "'dataset_config'"):
        load_config(write(tmp_path, "train_dataset_task:\n  dataset_confg: {}\n"))
    with pytest.raises(ConfigError, match="train_dataset_task.type: 'CausalLanguageModelDatset'.*did you mean"):
        load_config(write(tmp_path, "train_dataset_task:\n  type: CausalLanguageModelDatset\n"))


def _resolve(tmp_path, **keys):
    from mindformers_sft.pretrained import resolve_pretrained
    lines = [f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in keys.items()]
    cfg = load_config(write(tmp_path, "use_legacy: False\n" + "\n".join(lines) + "\n", "r.yaml"))
    resolve_pretrained(cfg, log=lambda *a: None)
    return cfg


def test_pretrained_model_dir_gives_weights_tokenizer_and_architecture(tmp_path):
    import transformers
    from mindformers_sft.run import model_config
    cfg = _resolve(tmp_path, pretrained_model_dir=STORIES, run_mode="finetune")
    assert cfg.load_checkpoint == STORIES and cfg.processor.tokenizer.vocab_file == STORIES
    ref = transformers.AutoConfig.from_pretrained(STORIES)
    conf = model_config(cfg, log=lambda *a: None)
    assert (conf.num_layers, conf.num_heads, conf.n_kv_heads, conf.hidden_size, conf.vocab_size) == (
        ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.hidden_size, ref.vocab_size)
    cfg = load_config(write(tmp_path, f"use_legacy: False\npretrained_model_dir: {STORIES}\nmodel:\n  model_config:\n"
                                      "    rms_norm_eps: 1.0e-6\n    params_dtype: float32\n", "o.yaml"))
    from mindformers_sft.pretrained import resolve_pretrained
    resolve_pretrained(cfg, log=lambda *a: None)
    conf = model_config(cfg, log=lambda *a: None)
    assert conf.rms_norm_eps == 1e-6 and conf.num_layers == ref.num_hidden_layers   # YAML overrides config.json


def test_pretrained_model_dir_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        _resolve(tmp_path, pretrained_model_dir=str(empty))
    (empty / "config.json").write_text(open(os.path.join(STORIES, "config.json")).read())
    with pytest.raises(ConfigError, match=r"has no \*.safetensors weights and load_checkpoint is empty"):
        _resolve(tmp_path, pretrained_model_dir=str(empty), run_mode="finetune")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        _resolve(tmp_path, pretrained_model_dir=str(empty), run_mode="train")
    with pytest.raises(ConfigError, match="is not a directory"):
        _resolve(tmp_path, pretrained_model_dir=str(tmp_path / "nope"))
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a .ckpt file but load_ckpt_format is 'safetensors'"):
        _resolve(tmp_path, load_checkpoint=str(ckpt), load_ckpt_format="safetensors")


def test_readme_tiny_command_resolves(monkeypatch):
    """`--config configs/qwen3/finetune_qwen3_tiny.yaml --run_mode train --vocab_file assets/tokenizers/qwen3`: the
    architecture of configs/qwen3/tiny_qwen3_hf/config.json (read by transformers too), random weights."""
    import transformers
    from mindformers_sft.pretrained import resolve_pretrained
    from mindformers_sft.run import model_config
    cfg = load_config(TINY, overrides={"run_mode": "train", "processor.tokenizer.vocab_file": "assets/tokenizers/qwen3"})
    monkeypatch.chdir(ROOT)
    resolve_pretrained(cfg, log=lambda *a: None)
    assert cfg.load_checkpoint == ""
    ref = transformers.AutoConfig.from_pretrained(os.path.join(ROOT, cfg.pretrained_model_dir))
    conf = model_config(cfg, log=lambda *a: None)
    assert (conf.model_type, conf.num_layers, conf.hidden_size, conf.head_dim, conf.n_kv_heads, conf.vocab_size,
            conf.tie_word_embeddings) == ("qwen3", ref.num_hidden_layers, ref.hidden_size, ref.head_dim,
                                          ref.num_key_value_heads, ref.vocab_size, False)   # YAML unties (random init)


def test_moe_pretrain_model_config_builds():
    """configs/qwen3_moe/pretrain_qwen3_30b_a3b_4k.yaml's model_config describes Qwen3-30B-A3B as transformers does."""
    import transformers
    from mindformers_sft.models.config import LlamaConfig
    conf = LlamaConfig.from_dict(load_config(os.path.join(MF, "pretrain_qwen3_30b_a3b_4k.yaml")).model.model_config)
    ref = transformers.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                      num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                      moe_intermediate_size=768, norm_topk_prob=False, rope_theta=1000000,
                                      max_position_embeddings=40960, tie_word_embeddings=False)
    assert (conf.model_type, conf.num_layers, conf.num_heads, conf.n_kv_heads, conf.head_dim, conf.num_experts,
            conf.num_experts_per_tok, conf.moe_intermediate_size, conf.norm_topk_prob, conf.theta,
            conf.tie_word_embeddings) == (ref.model_type, ref.num_hidden_layers, ref.num_attention_heads,
                                          ref.num_key_value_heads, ref.head_dim, ref.num_experts,
                                          ref.num_experts_per_tok, ref.moe_intermediate_size, ref.norm_topk_prob,
                                          ref.rope_theta, ref.tie_word_embeddings)


def test_predict_prompts_use_the_handlers_template():
    """predict/chat after a fine-tune with this YAML wrap prompts as AlpacaInstructDataHandler rendered the data."""
    from mindformers_sft.run import _predict_template
    from mindformers_sft.tokenizer import load_tokenizer
    cfg = load_config(OURS)
    tok = load_tokenizer(os.path.join(ROOT, "assets", "tokenizers", "qwen3"))
    assert _predict_template(cfg, None, tok).name == "vicuna_v1.1"
    assert _predict_template(cfg, "none", tok) is None
