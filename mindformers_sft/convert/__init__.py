"""Hugging Face <-> MindFormers weight conversion for the Llama family (names, shapes, streaming convert)."""
from .hf import (FAMILIES, HF_CONFIG_METADATA_KEY, ConvertResult, ModelSpec, build_parser, convert_hf_to_mf,
                 convert_mf_to_hf, expected_hf_shapes, expected_shapes, is_ignored_mf, load_model_config, main,
                 model_family, run, sidecar_config_path)
from .names import hf_to_mf, is_ignored_hf, mf_to_hf

__all__ = [
    "FAMILIES", "HF_CONFIG_METADATA_KEY", "ConvertResult", "ModelSpec", "build_parser", "convert_hf_to_mf",
    "convert_mf_to_hf", "expected_hf_shapes", "expected_shapes", "is_ignored_mf", "load_model_config", "main",
    "model_family", "run", "sidecar_config_path", "hf_to_mf", "is_ignored_hf", "mf_to_hf",
]
