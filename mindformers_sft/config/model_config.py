"""The Llama-family model config: MindFormers `model.model_config` names, built from YAML or a HF config.json.

It lives in config/ because config/ validates `model.model_config` keys and types against it (KEY_ALIASES,
MINDFORMERS_IGNORED_KEYS, the dataclass fields); models/config.py imports it from here for the model families.

One dataclass covers Llama-2, Llama-3/3.1 (GQA, rope_theta, llama3 rope scaling) and Qwen2/Qwen2.5
(q/k/v bias, tied or untied embeddings). Field names are MindFormers' (`num_layers`, `num_heads`,
`n_kv_heads`, `theta`, `qkv_has_bias`, `compute_dtype`, ...), so a MindFormers YAML loads unchanged.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


def normalize_dtype(value: str, key: str = "dtype") -> str:
    v = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if v not in DTYPES:
        raise ConfigError(f"{key}: '{value}' is not a dtype; expected one of {', '.join(DTYPES)} (or fp32/fp16/bf16)")
    return v


@dataclass
class LlamaConfig:
    """Hyper-parameters of the decoder. Defaults are Llama-2-7B's."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: Optional[int] = None          # None -> num_heads (MHA)
    intermediate_size: Optional[int] = None   # None -> derived from multiple_of / ffn_dim_multiplier as MindFormers
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0                    # rope base
    rope_scaling: Optional[dict] = None       # HF rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embedding: int = 4096
    seq_length: int = 4096
    batch_size: int = 1
    qkv_has_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: Any = 2                     # int or list of ints (Llama-3 instruct has several)
    pad_token_id: int = 0
    ignore_token_id: int = -100
    model_type: str = "llama"                 # "llama" | "qwen2" | "qwen3" | "qwen3_moe"
    head_dim: Optional[int] = None            # None -> hidden_size // num_heads (Qwen3 sets it explicitly)
    # Qwen3 / Qwen3-MoE (MindFormers 1.8 mcore layout; see models/qwen3.py). qkv_concat None -> True for qwen3*
    qkv_concat: Optional[bool] = None         # fused linear_qkv + linear_fc1; False: linear_q/k/v, gating/hidden
    use_contiguous_weight_layout_attention: bool = False   # linear_qkv rows [q; k; v] instead of per kv group
    use_interleaved_weight_layout_mlp: bool = True         # linear_fc1 rows [g0, u0, g1, u1, ...] vs [gate; up]
    num_experts: int = 0                      # > 0: Qwen3-MoE sparse layers
    num_experts_per_tok: int = 8
    moe_intermediate_size: Optional[int] = None
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False        # as transformers: the aux loss joins the training loss only if True
    compute_dtype: str = "float32"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    use_flash_attention: bool = False         # Ascend only; ignored on CPU
    use_past: bool = False
    emb_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    pet_config: Optional[dict] = None
    # Generation defaults (MindFormers keeps these in model_config).
    max_decode_length: int = 512
    do_sample: bool = False
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    checkpoint_name_or_path: str = ""
    extra: dict = field(default_factory=dict)  # accepted MindFormers keys we do not act on

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads if self.num_heads else None
        if self.qkv_concat is None:
            self.qkv_concat = self.is_qwen3
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = derive_intermediate_size(self.hidden_size, self.multiple_of,
                                                              self.ffn_dim_multiplier)
        for k in ("compute_dtype", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype",
                  "param_init_type"):
            setattr(self, k, normalize_dtype(getattr(self, k), f"model_config.{k}"))
        self.validate()

    @property
    def is_qwen3(self) -> bool:
        """Qwen3 / Qwen3-MoE: q/k RMSNorm, explicit head_dim, MindFormers mcore parameter names."""
        return self.model_type in ("qwen3", "qwen3_moe")

    def is_moe_layer(self, i: int) -> bool:
        """Layer i has a sparse MoE block (transformers' Qwen3MoeDecoderLayer rule)."""
        return (self.model_type == "qwen3_moe" and i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_token_ids(self) -> list:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def validate(self):
        def pos(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model_config.{name}: expected a positive integer, got {v!r}")
        for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size"):
            pos(n)
        if self.is_qwen3:
            pos("head_dim")
        if self.model_type == "qwen3_moe":
            self._validate_moe()
        if self.hidden_size % self.num_heads and not self.is_qwen3:
            raise ConfigError(f"model_config.hidden_size ({self.hidden_size}) must divide by num_heads "
                              f"({self.num_heads})")
        if self.num_heads % self.n_kv_heads:
            raise ConfigError(f"model_config.num_heads ({self.num_heads}) must divide by n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_config.model_type: '{self.model_type}' is not supported; expected 'llama' "
                              "(Llama-2/3), 'qwen2' (Qwen2/Qwen2.5), 'qwen3' or 'qwen3_moe'")

    def _validate_moe(self):
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise ConfigError(f"model_config.num_experts: expected a positive integer for qwen3_moe, "
                              f"got {self.num_experts!r}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"model_config.num_experts_per_tok: expected 1..num_experts ({self.num_experts}), "
                              f"got {self.num_experts_per_tok!r}")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            raise ConfigError(f"model_config.moe_intermediate_size: expected a positive integer, "
                              f"got {self.moe_intermediate_size!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step <= 0:
            raise ConfigError(f"model_config.decoder_sparse_step: expected a positive integer, "
                              f"got {self.decoder_sparse_step!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.model_config") -> "LlamaConfig":
        """Build from a MindFormers `model_config` mapping; unknown keys are errors naming the closest key."""
        d = dict(d)
        d.pop("type", None)  # "LlamaConfig"
        for alias, name in KEY_ALIASES.items():   # MindFormers 1.8 YAMLs use the HF names
            if alias in d:
                if name in d and d[name] != d[alias]:
                    raise ConfigError(f"{where}: '{alias}' ({d[alias]!r}) and '{name}' ({d[name]!r}) disagree")
                d[name] = d.pop(alias)
        if d.get("hidden_act", "silu") not in ("silu", "swiglu"):
            raise ConfigError(f"{where}.hidden_act: '{d['hidden_act']}' is not supported; expected 'silu'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {}
        for k in list(d):
            if k in names:
                continue
            if k in MINDFORMERS_IGNORED_KEYS:
                extra[k] = d.pop(k)
                continue
            close = difflib.get_close_matches(k, sorted(names | MINDFORMERS_IGNORED_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{k}'{hint}")
        return cls(**d, extra=extra)

    @classmethod
    def from_hf_config(cls, path_or_dict, **overrides) -> "LlamaConfig":
        """Build from a Hugging Face config.json (path to the file, its directory, or the parsed dict)."""
        src = "config.json"
        if isinstance(path_or_dict, (str, os.PathLike)):
            p = str(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise ConfigError(f"{p}: no Hugging Face config.json there")
            src = p
            try:
                with open(p, encoding="utf-8") as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        else:
            hf = dict(path_or_dict)
        mt = hf.get("model_type", "llama")
        if mt not in HF_MODEL_TYPES:
            raise ConfigError(f"{src}: model_type '{mt}' is not supported; expected one of {sorted(HF_MODEL_TYPES)}")
        for req in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if req not in hf:
                raise ConfigError(f"{src}: missing key '{req}'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{src}: hidden_act '{hf['hidden_act']}' is not supported; expected 'silu'")
        kw = dict(
            model_type=HF_MODEL_TYPES[mt],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf.get("intermediate_size"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=hf.get("rope_scaling"),
            max_position_embedding=hf.get("max_position_embeddings", 4096),
            seq_length=min(hf.get("max_position_embeddings", 4096), 4096),
            qkv_has_bias=bool(hf.get("attention_bias", HF_MODEL_TYPES[mt] == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
            eos_token_id=hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 2,
            pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if HF_MODEL_TYPES[mt] in ("qwen3", "qwen3_moe"):
            for key, ok in (("attention_bias", False), ("use_sliding_window", False)):
                if hf.get(key, ok) != ok:
                    raise ConfigError(f"{src}: {key} {hf[key]} is not supported for {mt}; expected {ok}")
            kw.update(head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                      qkv_has_bias=bool(hf.get("attention_bias", False)))
            if mt == "qwen3_moe":
                for req in ("num_experts", "moe_intermediate_size"):
                    if req not in hf:
                        raise ConfigError(f"{src}: missing key '{req}' (model_type qwen3_moe)")
                kw.update({k: hf[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                              "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                                              "router_aux_loss_coef", "output_router_logits") if k in hf})
        elif hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            raise ConfigError(f"{src}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads is not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """The Hugging Face config.json for this model (Llama, Qwen2, Qwen3 or Qwen3Moe ForCausalLM)."""
        qwen = self.model_type == "qwen2"
        d = {
            "architectures": [HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embedding,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.param_init_type,
        }
        if self.is_qwen3:
            d.update(head_dim=self.head_dim, attention_bias=self.qkv_has_bias, use_sliding_window=False,
                     pad_token_id=self.pad_token_id)
            if self.model_type == "qwen3_moe":
                d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                         moe_intermediate_size=self.moe_intermediate_size,
                         decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                         norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef,
                         output_router_logits=self.output_router_logits)
        elif not qwen:
            d["attention_bias"] = self.qkv_has_bias
            d["mlp_bias"] = False
            d["pad_token_id"] = self.pad_token_id
        else:
            d["use_sliding_window"] = False
        return d

    def weight_layout(self) -> dict:
        """How the fused Qwen3 tensors are laid out (LAYOUT_KEYS): not in config.json, so training checkpoints
        record it in meta.json ("weight_layout") and loading / --reversed read it back."""
        return {k: getattr(self, k) for k in LAYOUT_KEYS}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


def derive_intermediate_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None):
    """MindFormers/Meta rule: 2/3 of 4*hidden, times ffn_dim_multiplier, rounded up to multiple_of."""
    h = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
LAYOUT_KEYS = ("qkv_concat", "use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")
HF_MODEL_TYPES = {t: t for t in MODEL_TYPES}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM"}
# HF config.json names (MindFormers 1.8 YAMLs use them) -> our model_config names
KEY_ALIASES = {
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "n_kv_heads",
    "rope_theta": "theta", "max_position_embeddings": "max_position_embedding", "attention_bias": "qkv_has_bias",
    "params_dtype": "param_init_type", "softmax_compute_dtype": "softmax_compute_type",
    "layernorm_compute_dtype": "layernorm_compute_type",
}

# MindFormers model_config keys that are accepted (so its YAMLs load) but have no effect here.
MINDFORMERS_IGNORED_KEYS = {
    "layernorm_compute_type", "use_past_shard", "offset", "extend_method", "fine_grain_interleave",
    "qkv_concat", "rotary_pct", "rotary_emb_base", "scaling_factor", "is_dynamic", "use_rope_slice",
    "use_ring_attention", "use_attn_mask_compression", "use_eod_attn_mask_compression", "parallel_optimizer",
    "block_size", "num_blocks", "quant_config", "tokenizer_type", "run_mode", "return_dict_in_generate",
    "output_scores", "pp_interleave_num", "init_method_std", "use_flash_attention_v2", "input_sliced_sig",
    "recompute", "qkv_has_bias_", "auto_map", "residual_dtype", "start_stage", "stage_num", "use_fused_rope",
    "use_fused_swiglu", "use_rmsnorm", "embedding_init_type", "post_process", "lm_head_dtype",
    # MindFormers 1.8 (mcore) Qwen3 / Qwen3-MoE YAML keys without effect here
    "hidden_act", "hidden_dropout", "attention_dropout", "untie_embeddings_and_output_weights",
    "position_embedding_type", "fp32_residual_connection", "qk_layernorm", "architectures", "use_cache",
    "add_bias_linear", "moe_grouped_gemm", "router_dense_type", "gated_linear_unit", "moe_router_pre_softmax",
    "moe_token_drop_policy", "routed_scaling_factor", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "normalization",
}
MINDFORMERS_IGNORED_KEYS -= {f.name for f in dataclasses.fields(LlamaConfig)}
