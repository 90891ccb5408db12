"""The model families' config (`from .config import LlamaConfig`): defined in config/model_config.py, where config/
validates `model.model_config` keys against it without importing models/."""
from ..config.model_config import (DTYPES, HF_ARCHITECTURES, HF_MODEL_TYPES, KEY_ALIASES, LAYOUT_KEYS,
                                   MINDFORMERS_IGNORED_KEYS, MODEL_TYPES, LlamaConfig, derive_intermediate_size,
                                   normalize_dtype)

__all__ = ["DTYPES", "HF_ARCHITECTURES", "HF_MODEL_TYPES", "KEY_ALIASES", "LAYOUT_KEYS", "MINDFORMERS_IGNORED_KEYS",
           "MODEL_TYPES", "LlamaConfig", "derive_intermediate_size", "normalize_dtype"]
