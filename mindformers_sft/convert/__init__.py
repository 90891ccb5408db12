"""Hugging Face <-> MindFormers weight conversion (names, shapes, grouped streaming convert)."""
from .hf import ConvertResult, build_parser, convert_hf_to_mf, convert_mf_to_hf, main, run
from .layouts import expected_hf_shapes, expected_shapes, layout_for
from .names import hf_to_mf, is_ignored_hf, is_ignored_mf, mf_to_hf
from .spec import (FAMILIES, HF_CONFIG_METADATA_KEY, ModelSpec, load_model_config, model_family,
                   sidecar_config_path)

__all__ = [
    "FAMILIES", "HF_CONFIG_METADATA_KEY", "ConvertResult", "ModelSpec", "build_parser", "convert_hf_to_mf",
    "convert_mf_to_hf", "expected_hf_shapes", "expected_shapes", "is_ignored_mf", "layout_for",
    "load_model_config", "main", "model_family", "run", "sidecar_config_path", "hf_to_mf", "is_ignored_hf",
    "mf_to_hf",
]
