"""Llama-family decoder (Llama-2, Llama-3/3.1, Qwen2/2.5) as a MindSpore Cell with MindFormers parameter names.

Parameter names (exactly MindFormers'; see convert/names.py):
  model.tok_embeddings.embedding_weight              (vocab, hidden)
  model.layers.N.attention.wq|wk|wv|wo.weight        (out, in) as in HF; wq/wk/wv `.bias` when qkv_has_bias
  model.layers.N.feed_forward.w1|w2|w3.weight        w1 = gate, w2 = down, w3 = up
  model.layers.N.attention_norm.weight, model.layers.N.ffn_norm.weight, model.norm_out.weight
  lm_head.weight                                     absent when tie_word_embeddings (logits use the embedding)
Every projection is its own `Linear` cell (attributes `attention.wq`, ..., `feed_forward.w3`), so a LoRA wrapper
can swap them by name. Parameters are stored in `param_init_type` and cast to `compute_dtype` inside; norms,
softmax, logits and the loss are fp32. Device-specific kernels live in kernels.py.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ..errors import ConfigError
from . import fused_decode, kernels
from .causal_lm import MS_DTYPES, CausalLM, KVCache, _cast, make_mask  # noqa: F401  (KVCache, make_mask re-exported)
from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies (head_dim/2,) float32, as transformers' rope init functions.

    Supports rope_scaling None / 'default', 'linear' and 'llama3' (transformers' _compute_llama3_parameters);
    other types (e.g. 'dynamic', 'yarn') raise ConfigError.
    """
    dim = config.head_dim
    inv = (1.0 / (np.float32(config.theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)))
    inv = inv.astype(np.float32)
    rs = config.rope_scaling
    rtype = (rs.get("rope_type", rs.get("type", "default")) if rs else "default")
    if rtype == "default":
        return inv
    if rtype == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    if rtype != "llama3":
        raise ConfigError(f"model_config.rope_scaling: rope_type '{rtype}' is not supported; "
                          "expected one of 'default', 'linear', 'llama3'")
    try:
        factor, low, high = (np.float32(rs[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_len = np.float32(rs["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"model_config.rope_scaling: 'llama3' needs key {e.args[0]!r}") from None
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv
    inv_l = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


class Linear(nn.Cell):
    """y = x @ weight.T (+ bias); weight (out_features, in_features) stored in param_dtype, computed in compute_dtype."""

    def __init__(self, in_features, out_features, has_bias=False, param_dtype=ms.float32,
                 compute_dtype=ms.float32, init_std=0.02):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer(Normal(init_std), (out_features, in_features), param_dtype), name="weight")
        self.bias = (Parameter(initializer("zeros", (out_features,), param_dtype), name="bias")
                     if has_bias else None)
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()       # primitives held as attributes can be given shard strategies
        self.out_perm = None            # set_out_perm: outputs in another order than the stored rows

    def set_out_perm(self, perm):
        """Output feature j = stored row perm[j] (int array, a permutation of out_features): the weight rows are
        gathered before the matmul, which costs out x in per call instead of a strided copy of the activations.
        The checkpoint keeps the stored layout. For the single-device CPU path only (the gather would cross
        shards under model parallel)."""
        perm = np.asarray(perm, np.int32)
        if sorted(perm.tolist()) != list(range(self.out_features)):
            raise ValueError(f"out_perm must be a permutation of {self.out_features} rows")
        self.out_perm = Tensor(perm)

    def plain_weight(self):
        """The weight when the layer is y = x @ weight.T exactly (no bias, stored rows in output order), else None."""
        return self.weight if not self.has_bias and self.out_perm is None else None

    def rows(self, p):
        """A (out_features, ...) parameter in output order."""
        return p if self.out_perm is None else ops.gather(p, self.out_perm, 0)

    def construct(self, x):
        shape = x.shape
        y = self.matmul(ops.reshape(_cast(x, self.compute_dtype), (-1, self.in_features)),
                        _cast(self.rows(self.weight), self.compute_dtype))
        if self.has_bias:
            y = self.bias_add(y, _cast(self.rows(self.bias), self.compute_dtype))
        return ops.reshape(y, shape[:-1] + (self.out_features,))


class Embedding(nn.Cell):
    def __init__(self, vocab_size, hidden_size, param_dtype, compute_dtype, init_std, fused,
                 param_name="embedding_weight"):
        super().__init__()
        self.compute_dtype = compute_dtype
        # MindSpore's CPU Gather has no bf16 kernel: cast the table first there
        self.cast_first = (not fused) and param_dtype == ms.bfloat16
        # param_name: the attribute (= checkpoint name) of the table; a subclass naming it otherwise overrides table()
        setattr(self, param_name, Parameter(initializer(Normal(init_std), (vocab_size, hidden_size), param_dtype),
                                            name=param_name))
        self.gather = ops.Gather()

    def table(self):
        return self.embedding_weight

    def construct(self, input_ids):
        if self.cast_first:
            return self.gather(_cast(self.table(), self.compute_dtype), input_ids, 0)
        return _cast(self.gather(self.table(), input_ids, 0), self.compute_dtype)


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps, param_dtype, fused, cpu_kernel=False):
        super().__init__()
        self.eps, self.fused, self.cpu_kernel = eps, fused, cpu_kernel
        self.eps_t = Tensor(np.array([eps], np.float32))   # for kernels.cpu_rms_norm
        self.weight = Parameter(initializer("ones", (dim,), param_dtype), name="weight")

    def construct(self, x):
        if self.cpu_kernel and x.dtype == ms.float32:
            return kernels.cpu_rms_norm(x, _cast(self.weight, ms.float32), self.eps_t)
        return kernels.rms_norm(x, self.weight, self.eps, self.fused)


class Attention(nn.Cell):
    """Grouped-query attention with rotary embedding; a family changes `_project` (x -> q, k, v) and `_out`."""

    def __init__(self, cfg: LlamaConfig, fused: bool):
        super().__init__()
        self._setup(cfg, fused)
        pd, cd, std = MS_DTYPES[cfg.param_init_type], MS_DTYPES[cfg.compute_dtype], cfg.initializer_range
        h, kvh = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim
        self.wq = Linear(h, h, cfg.qkv_has_bias, pd, cd, std)
        self.wk = Linear(h, kvh, cfg.qkv_has_bias, pd, cd, std)
        self.wv = Linear(h, kvh, cfg.qkv_has_bias, pd, cd, std)
        self.wo = Linear(h, h, False, pd, cd, std)

    def _setup(self, cfg: LlamaConfig, fused: bool):
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale, self.fused = 1.0 / math.sqrt(cfg.head_dim), fused
        self.scale_t = Tensor(np.array([self.scale], np.float32))   # for kernels.cpu_attention

    def _project(self, x):
        """x (B, S, H) -> q (B, S, Nq, D), k, v (B, S, Nkv, D), before the rotary embedding."""
        b, s, _ = x.shape
        return (ops.reshape(self.wq(x), (b, s, self.n_heads, self.head_dim)),
                ops.reshape(self.wk(x), (b, s, self.n_kv, self.head_dim)),
                ops.reshape(self.wv(x), (b, s, self.n_kv, self.head_dim)))

    def _out(self, o):
        return self.wo(o)

    def construct(self, x, cos, sin, mask, past_k=None, past_v=None):
        """x (B, S, H) -> (out (B, S, H), k, v) with k, v (B, Nkv, T, D) including past_k/past_v if given.

        With `mask` a tuple (the visibility spec of CausalLM._attention_mask, fused CPU kernel; cos/sin
        (B, S, D)), there is no cache: k and v are returned as None.
        """
        b, s, _ = x.shape
        q, k, v = self._project(x)
        if isinstance(mask, tuple):
            o = kernels.cpu_attention(q, k, v, cos, sin, mask, self.scale_t)
            return self._out(ops.reshape(o, (b, s, self.n_heads * self.head_dim))), None, None
        q = ops.transpose(q, (0, 2, 1, 3))
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 1, 3))
        q, k = kernels.apply_rope(q, k, cos, sin, self.fused)
        if past_k is not None:
            k = ops.cat((past_k, k), 2)
            v = ops.cat((past_v, v), 2)
        o = kernels.attention(q, k, v, mask, self.scale, self.fused)
        o = ops.reshape(ops.transpose(o, (0, 2, 1, 3)), (b, s, self.n_heads * self.head_dim))
        return self._out(o), k, v


class FeedForward(nn.Cell):
    """SwiGLU MLP; a family changes `_gate_up` (x -> gate, up) and `_down`."""

    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False):
        super().__init__()
        pd, cd, std = MS_DTYPES[cfg.param_init_type], MS_DTYPES[cfg.compute_dtype], cfg.initializer_range
        self.fused, self.cpu_kernel = fused, cpu_kernel
        self.w1 = Linear(cfg.hidden_size, cfg.intermediate_size, False, pd, cd, std)  # gate
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, False, pd, cd, std)  # down
        self.w3 = Linear(cfg.hidden_size, cfg.intermediate_size, False, pd, cd, std)  # up

    def _gate_up(self, x):
        return self.w1(x), self.w3(x)

    def _down(self, y):
        return self.w2(y)

    def construct(self, x):
        gate, up = self._gate_up(x)
        if self.cpu_kernel and gate.dtype == ms.float32:
            return self._down(kernels.cpu_swiglu(gate, up))
        return self._down(kernels.swiglu(gate, up, self.fused))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False):
        super().__init__()
        pd = MS_DTYPES[cfg.param_init_type]
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.attention = Attention(cfg, fused)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.feed_forward = FeedForward(cfg, fused, cpu_kernel)

    def construct(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, k, v = self.attention(self.attention_norm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x))
        return x, k, v


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and final norm; returns hidden states (B, S, H) in compute dtype."""

    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False):
        super().__init__()
        pd, cd = MS_DTYPES[cfg.param_init_type], MS_DTYPES[cfg.compute_dtype]
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, pd, cd, cfg.initializer_range, fused)
        self.layers = nn.CellList([DecoderLayer(cfg, fused, cpu_kernel) for _ in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.inv_freq = Tensor(rope_inv_freq(cfg).reshape(1, 1, -1))  # constant, not a Parameter

    def rope(self, position_ids, heads_axis=True):
        """cos, sin (B, 1, S, D) fp32 for int positions (B, S); (B, S, D) with heads_axis=False."""
        freqs = ops.expand_dims(ops.cast(position_ids, ms.float32), -1) * self.inv_freq
        emb = ops.cat((freqs, freqs), -1)
        if not heads_axis:
            return ops.cos(emb), ops.sin(emb)
        return ops.expand_dims(ops.cos(emb), 1), ops.expand_dims(ops.sin(emb), 1)

    def construct(self, tokens, position_ids, mask):
        """mask: bool (B, 1, S, S), the fp32 additive mask of kernels.attention_bias, or the spec tuple of the
        fused CPU kernel (see LlamaForCausalLM._attention_mask)."""
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope(position_ids, not isinstance(mask, tuple))
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, mask)
        return self.norm_out(x)

    def forward_with_cache(self, tokens, position_ids, mask, past):
        """PyNative helper: like construct, with past = list of (k, v) per layer or None; returns (h, presents)."""
        cos, sin = self.rope(position_ids)
        x, presents = layers_with_cache(self.layers, self.tok_embeddings(tokens), cos, sin, mask, past)
        return self.norm_out(x), presents


def layers_with_cache(layers, x, cos, sin, mask, past):
    """PyNative: run decoder layers (each -> (x, k, v, ...)) with past = list of (k, v) per layer or None;
    returns (x, presents)."""
    presents = []
    for i, layer in enumerate(layers):
        pk, pv = past[i] if past is not None else (None, None)
        out = layer(x, cos, sin, mask, pk, pv)
        x = out[0]
        presents.append((out[1], out[2]))
    return x, presents


class LlamaForCausalLM(CausalLM):
    """Llama / Qwen2 causal LM (interface: causal_lm.CausalLM)."""
    EMBEDDING_NAME, OUTPUT_NAME = "model.tok_embeddings.embedding_weight", "lm_head.weight"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config, self.fused, self.cpu_kernel)
        if not self.tie:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, MS_DTYPES[config.param_init_type],
                                  self.compute_dtype, config.initializer_range)

    def decoder_layers(self):
        return list(self.model.layers)

    def _embedding_table(self):
        return self.model.tok_embeddings.embedding_weight

    def _output(self, h):
        return self.lm_head(h)

    def _output_weight(self):
        return self.lm_head.plain_weight() if isinstance(self.lm_head, Linear) else None

    def _decoder(self, tokens, position_ids, mask):
        return self.model(tokens, position_ids, mask)

    def _decoder_with_cache(self, tokens, position_ids, mask, past):
        return self.model.forward_with_cache(tokens, position_ids, mask, past)

    def decode_layout(self):
        """The weights of the fused CPU decode step (fused_decode.py): separate q/k/v and gate/up matrices."""
        m = self.model
        layers = [fused_decode.LayerWeights(
            layer.attention_norm.weight, layer.ffn_norm.weight, None, None,
            [layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
             layer.feed_forward.w1, layer.feed_forward.w3, layer.feed_forward.w2]) for layer in m.layers]
        output = m.tok_embeddings.embedding_weight if self.tie else getattr(self.lm_head, "weight", None)
        if output is None:        # an output layer wrapped by an adapter: not read by the fused step
            return None
        return fused_decode.DecodeLayout(layers, fused_decode.SEPARATE, fused_decode.SEPARATE,
                                         m.tok_embeddings.embedding_weight, m.norm_out.weight, output, m.inv_freq)
