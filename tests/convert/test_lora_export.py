"""A LoRA run's checkpoint exports to Hugging Face: merged weights that transformers loads with the logits
of the unmerged model, and a PEFT adapter that peft loads onto the base with the same logits."""
import numpy as np
import torch
from mindspore import Tensor
from peft import PeftModel
from transformers import LlamaForCausalLM as HFLlama

from mindformers_sft.convert import hf as convert_cli
from mindformers_sft.run import build_model
from mindformers_sft.trainer.loop import train
from tests.paths import STORIES
from tests.trainer.train_job import TokenDataset, config


def _trained_lora(out, targets):
    cfg = config(str(out), lora=True, steps=3)
    cfg.model.model_config["pet_config"]["target_modules"] = targets
    cfg.context.device_target = "CPU"
    model = build_model(cfg, log=lambda *a: None)
    train(cfg, model, TokenDataset(n=16))
    return model


def _check(tmp_path, targets):
    model = _trained_lora(tmp_path / "run", targets)
    ids = np.random.default_rng(3).integers(3, 512, (2, 20)).astype(np.int32)
    ours = model.logits(Tensor(ids)).asnumpy()
    merged, peft_dir = tmp_path / "merged", tmp_path / "peft"
    assert convert_cli.main(["--reversed", "--input_path", str(tmp_path / "run" / "checkpoint"),
                             "--output_path", str(merged), "--peft_path", str(peft_dir)]) == 0
    with torch.no_grad():
        hf = HFLlama.from_pretrained(str(merged), dtype=torch.float32)
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        assert np.abs(ours - ref).max() < 1e-4
        base = HFLlama.from_pretrained(STORIES, dtype=torch.float32)
        base_logits = base(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        assert np.abs(base_logits - ref).max() > 1e-3          # the adapters did change the model
        peft_model = PeftModel.from_pretrained(base, str(peft_dir))
        via_peft = peft_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - via_peft).max() < 1e-4


def test_lora_export_all_layers(tmp_path):
    _check(tmp_path, ".*wq|.*wv|.*w2")


def test_lora_export_some_layers(tmp_path):
    _check(tmp_path, r"model\.layers\.[13]\.attention\.wk|.*layers\.0\.feed_forward\.w1")


def test_full_finetune_checkpoint_dir_exports(tmp_path):
    """A full fine-tune's checkpoint directory converts back without --config (meta.json has the architecture)."""
    cfg = config(str(tmp_path / "run"), steps=2)
    cfg.context.device_target = "CPU"
    model = build_model(cfg, log=lambda *a: None)
    train(cfg, model, TokenDataset(n=16))
    ids = np.random.default_rng(4).integers(3, 512, (1, 16)).astype(np.int32)
    ours = model.logits(Tensor(ids)).asnumpy()
    out = tmp_path / "hf"
    assert convert_cli.main(["--reversed", "--input_path", str(tmp_path / "run" / "checkpoint"),
                             "--output_path", str(out)]) == 0
    with torch.no_grad():
        ref = HFLlama.from_pretrained(str(out), dtype=torch.float32)(torch.tensor(ids, dtype=torch.long)).logits
    assert np.abs(ours - ref.numpy()).max() < 1e-4
