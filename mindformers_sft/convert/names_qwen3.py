"""Hugging Face <-> MindFormers 1.8 (mcore training model) names and layouts for Qwen3 and Qwen3-MoE.

The table (MF name, shape, HF source) is in the docstring of models/qwen3.py; this module is its code.
Two levels:
- `hf_to_mf` / `mf_to_hf`: one tensor name to one name (MindFormers' `weight_mapping` of qwen3/utils.py and
  qwen3_moe/utils.py). q/k/v map to the split names `linear_q|linear_k|linear_v`, gate/up to `mlp.gating|mlp.hidden`,
  experts to `mlp.experts.E.gating|hidden|linear_fc2` -- the names of the model built with qkv_concat False (for
  experts: the per-expert parts of the stacked weights).
- `hf_state_to_mf` / `mf_state_to_hf`: whole state dicts, fusing q/k/v into `linear_qkv` and gate/up into
  `linear_fc1` (qkv_concat True), and stacking experts into `experts.weight1/weight2`, with the pure numpy helpers
  `qkv_concat`/`qkv_split`, `fc1_concat`/`fc1_split`, `experts_stack`/`experts_unstack` (usable per layer for
  streaming, and on LoRA B matrices, whose rows follow the weight's rows).

`cfg` is anything with the attributes of config.model_config.LlamaConfig: num_heads, n_kv_heads, head_dim, hidden_size,
qkv_concat, use_contiguous_weight_layout_attention, use_interleaved_weight_layout_mlp, num_experts,
moe_intermediate_size, num_layers and `is_moe_layer(i)`.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

from ..errors import CheckpointError

_TOP = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_LAYER = {   # HF part after model.layers.N. -> MF part after decoder.layers.N.
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.q_proj.weight": "self_attention.linear_q.weight",
    "self_attn.k_proj.weight": "self_attention.linear_k.weight",
    "self_attn.v_proj.weight": "self_attention.linear_v.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gating.weight",
    "mlp.up_proj.weight": "mlp.hidden.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.gate.weight": "mlp.router.weight",
}
_EXPERT = {"gate_proj": "gating", "up_proj": "hidden", "down_proj": "linear_fc2"}
_TOP_R = {v: k for k, v in _TOP.items()}
_LAYER_R = {v: k for k, v in _LAYER.items()}
_EXPERT_R = {v: k for k, v in _EXPERT.items()}
_HF_L = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_MF_L = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
_HF_E = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MF_E = re.compile(r"mlp\.experts\.(\d+)\.(gating|hidden|linear_fc2)\.weight$")
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _where(source):
    return f"{source}: " if source else ""


def is_ignored_hf(name: str) -> bool:
    return name.endswith(HF_IGNORED_SUFFIXES)


def hf_to_mf(name: str, source: str = "") -> str:
    """One HF Qwen3/Qwen3-MoE tensor name -> its MF (split) name; CheckpointError naming the tensor otherwise."""
    if name in _TOP:
        return _TOP[name]
    m = _HF_L.match(name)
    if m:
        i, rest = m.groups()
        if rest in _LAYER:
            return f"decoder.layers.{i}.{_LAYER[rest]}"
        e = _HF_E.match(rest)
        if e:
            return f"decoder.layers.{i}.mlp.experts.{e.group(1)}.{_EXPERT[e.group(2)]}.weight"
    raise CheckpointError(f"{_where(source)}tensor '{name}' is not a Qwen3/Qwen3-MoE weight name (expected e.g. "
                          "'model.layers.0.self_attn.q_norm.weight')")


def mf_to_hf(name: str, source: str = "") -> str:
    """One MF (split) name -> its HF name (inverse of hf_to_mf)."""
    if name in _TOP_R:
        return _TOP_R[name]
    m = _MF_L.match(name)
    if m:
        i, rest = m.groups()
        if rest in _LAYER_R:
            return f"model.layers.{i}.{_LAYER_R[rest]}"
        e = _MF_E.match(rest)
        if e:
            return f"model.layers.{i}.mlp.experts.{e.group(1)}.{_EXPERT_R[e.group(2)]}.weight"
    raise CheckpointError(f"{_where(source)}tensor '{name}' is not a MindFormers Qwen3 parameter name (expected "
                          "e.g. 'decoder.layers.0.self_attention.linear_qkv.weight')")


# ---- layouts (pure numpy; axis 0 is the output rows, so LoRA B matrices and biases split the same way) ----
def qkv_concat(q, k, v, n_heads: int, n_kv: int, head_dim: int, contiguous: bool = False) -> np.ndarray:
    """q (Nq*D, ...), k, v (Nkv*D, ...) -> linear_qkv ((Nq+2*Nkv)*D, ...).

    Interleaved (MF default, Megatron): per kv group g: [q heads g*rep..g*rep+rep-1, k head g, v head g].
    contiguous (use_contiguous_weight_layout_attention): [q; k; v].
    """
    if contiguous:
        return np.concatenate((q, k, v), 0)
    rep, tail = n_heads // n_kv, q.shape[1:]
    parts = (q.reshape((n_kv, rep * head_dim) + tail), k.reshape((n_kv, head_dim) + tail),
             v.reshape((n_kv, head_dim) + tail))
    return np.concatenate(parts, 1).reshape(((rep + 2) * n_kv * head_dim,) + tail)


def qkv_split(qkv, n_heads: int, n_kv: int, head_dim: int, contiguous: bool = False):
    """Inverse of qkv_concat -> (q, k, v)."""
    nq, nk = n_heads * head_dim, n_kv * head_dim
    if contiguous:
        return qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:]
    rep, tail = n_heads // n_kv, qkv.shape[1:]
    g = qkv.reshape((n_kv, (rep + 2) * head_dim) + tail)
    q = g[:, :rep * head_dim].reshape((nq,) + tail)
    k = g[:, rep * head_dim:(rep + 1) * head_dim].reshape((nk,) + tail)
    v = g[:, (rep + 1) * head_dim:].reshape((nk,) + tail)
    return np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)


def fc1_concat(gate, up, interleaved: bool = True) -> np.ndarray:
    """gate, up (I, ...) -> linear_fc1 (2I, ...): interleaved rows [g0, u0, g1, u1, ...] (MF default,
    use_interleaved_weight_layout_mlp) or contiguous [gate; up]."""
    if not interleaved:
        return np.concatenate((gate, up), 0)
    return np.stack((gate, up), 1).reshape((2 * gate.shape[0],) + gate.shape[1:])


def fc1_split(fc1, interleaved: bool = True):
    """Inverse of fc1_concat -> (gate, up)."""
    if not interleaved:
        i = fc1.shape[0] // 2
        return fc1[:i], fc1[i:]
    g = fc1.reshape((fc1.shape[0] // 2, 2) + fc1.shape[1:])
    return np.ascontiguousarray(g[:, 0]), np.ascontiguousarray(g[:, 1])


def experts_stack(gates: List[np.ndarray], ups: List[np.ndarray], downs: List[np.ndarray]):
    """Per-expert HF gate/up (Im, H) and down (H, Im) -> (weight1 (E*H, 2*Im), weight2 (E*Im, H)), MF's
    concat_expert_weight: weight1 block e = [gate_e; up_e].T, weight2 block e = down_e.T."""
    if not (len(gates) == len(ups) == len(downs)) or not gates:
        raise CheckpointError(f"experts_stack: expected as many gate, up and down matrices (>= 1), got "
                              f"{len(gates)}, {len(ups)}, {len(downs)}")
    im, h = np.shape(gates[0])
    for e, (g, u, d) in enumerate(zip(gates, ups, downs)):
        if np.shape(g) != (im, h) or np.shape(u) != (im, h) or np.shape(d) != (h, im):
            raise CheckpointError(f"experts_stack: expert {e}: gate {np.shape(g)}, up {np.shape(u)}, "
                                  f"down {np.shape(d)}; expected ({im}, {h}), ({im}, {h}), ({h}, {im})")
    w1 = np.stack([np.concatenate((g, u), 0).T for g, u in zip(gates, ups)], 0)      # (E, H, 2Im)
    w2 = np.stack([np.asarray(d).T for d in downs], 0)                                # (E, Im, H)
    return np.ascontiguousarray(w1.reshape(-1, 2 * im)), np.ascontiguousarray(w2.reshape(-1, h))


def experts_unstack(weight1, weight2, num_experts: int):
    """Inverse of experts_stack -> (gates, ups, downs) lists of HF-layout arrays."""
    w1, w2 = np.asarray(weight1), np.asarray(weight2)
    if w1.ndim != 2 or w2.ndim != 2 or w1.shape[0] % num_experts or w1.shape[1] % 2 or w2.shape[0] % num_experts:
        raise CheckpointError(f"experts_unstack: weight1 {w1.shape} / weight2 {w2.shape} are not "
                              f"(E*H, 2*Im) / (E*Im, H) for E = {num_experts}")
    h, im = w1.shape[0] // num_experts, w1.shape[1] // 2
    if w2.shape != (num_experts * im, h):
        raise CheckpointError(f"experts_unstack: weight2 {w2.shape}; expected ({num_experts * im}, {h}) from "
                              f"weight1 {w1.shape}")
    w1 = w1.reshape(num_experts, h, 2 * im)
    w2 = w2.reshape(num_experts, im, h)
    gates = [np.ascontiguousarray(w1[e, :, :im].T) for e in range(num_experts)]
    ups = [np.ascontiguousarray(w1[e, :, im:].T) for e in range(num_experts)]
    downs = [np.ascontiguousarray(w2[e].T) for e in range(num_experts)]
    return gates, ups, downs


# ---- whole state dicts ----
def _shape_check(arr, expected, name, source, what):
    if tuple(arr.shape) != tuple(expected):
        raise CheckpointError(f"{_where(source)}tensor '{name}': expected shape {tuple(expected)} ({what}), "
                              f"found {tuple(arr.shape)}")


def hf_state_to_mf(arrays: Dict[str, np.ndarray], cfg, source: str = "") -> Dict[str, np.ndarray]:
    """HF-named arrays -> the MF-named arrays of the model `cfg` describes (fused and stacked as configured).

    Expert tensors are checked against num_experts / moe_intermediate_size / hidden_size: a missing expert, an
    extra one, or a wrong shape is a CheckpointError naming `source`, the tensor and what was expected.
    """
    split = {}
    experts: Dict[int, Dict[Tuple[int, str], Tuple[str, np.ndarray]]] = {}
    for name, arr in arrays.items():
        if is_ignored_hf(name):
            continue
        mf = hf_to_mf(name, source)
        m = _MF_L.match(mf)
        e = _MF_E.match(m.group(2)) if m else None
        if e:
            experts.setdefault(int(m.group(1)), {})[(int(e.group(1)), e.group(2))] = (name, arr)
        else:
            split[mf] = arr
    out = dict(split)
    if getattr(cfg, "qkv_concat", False):
        for mf in [k for k in split if k.endswith("self_attention.linear_q.weight")]:
            p = mf[: -len("linear_q.weight")]
            try:
                q, k, v = out.pop(mf), out.pop(p + "linear_k.weight"), out.pop(p + "linear_v.weight")
            except KeyError as err:
                raise CheckpointError(f"{_where(source)}missing tensor '{mf_to_hf(err.args[0])}' "
                                      "(q, k and v projections come together)") from None
            out[p + "linear_qkv.weight"] = qkv_concat(q, k, v, cfg.num_heads, cfg.n_kv_heads, cfg.head_dim,
                                                      cfg.use_contiguous_weight_layout_attention)
        for mf in [k for k in split if k.endswith("mlp.gating.weight")]:
            p = mf[: -len("gating.weight")]
            if p + "hidden.weight" not in out:
                raise CheckpointError(f"{_where(source)}missing tensor '{mf_to_hf(p + 'hidden.weight')}'")
            out[p + "linear_fc1.weight"] = fc1_concat(out.pop(mf), out.pop(p + "hidden.weight"),
                                                      cfg.use_interleaved_weight_layout_mlp)
    for layer, parts in sorted(experts.items()):
        out.update(_stack_layer(layer, parts, cfg, source))
    return out


def _stack_layer(layer, parts, cfg, source):
    n, h, im = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    if not cfg.is_moe_layer(layer):
        name = next(iter(parts.values()))[0]
        raise CheckpointError(f"{_where(source)}tensor '{name}': layer {layer} is a dense layer in config.json "
                              f"(decoder_sparse_step {cfg.decoder_sparse_step}, mlp_only_layers {cfg.mlp_only_layers})"
                              "; expected no experts there")
    extra = sorted(i for i, _ in parts if i >= n)
    if extra:
        name = parts[(extra[0], "gating")][0] if (extra[0], "gating") in parts else \
            next(v[0] for k, v in parts.items() if k[0] == extra[0])
        raise CheckpointError(f"{_where(source)}tensor '{name}': expert {extra[0]} but config.json has num_experts "
                              f"{n} (experts 0..{n - 1})")
    lists = {"gating": [], "hidden": [], "linear_fc2": []}
    for i in range(n):
        for kind, shape in (("gating", (im, h)), ("hidden", (im, h)), ("linear_fc2", (h, im))):
            hf = f"model.layers.{layer}.mlp.experts.{i}.{_EXPERT_R[kind]}.weight"
            if (i, kind) not in parts:
                raise CheckpointError(f"{_where(source)}missing tensor '{hf}' (config.json: num_experts {n})")
            _shape_check(parts[(i, kind)][1], shape, hf, source,
                         f"moe_intermediate_size {im}, hidden_size {h}")
            lists[kind].append(parts[(i, kind)][1])
    w1, w2 = experts_stack(lists["gating"], lists["hidden"], lists["linear_fc2"])
    p = f"decoder.layers.{layer}.mlp.experts."
    return {p + "weight1": w1, p + "weight2": w2}


def mf_state_to_hf(arrays: Dict[str, np.ndarray], cfg, source: str = "") -> Dict[str, np.ndarray]:
    """MF-named arrays (fused or split) -> HF-named arrays (q/k/v, gate/up and experts separated)."""
    out = {}
    for name, arr in arrays.items():
        if name.endswith("self_attention.linear_qkv.weight"):
            p = name[: -len("linear_qkv.weight")]
            _shape_check(arr, ((cfg.num_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.hidden_size), name, source,
                         "(num_heads + 2*n_kv_heads)*head_dim, hidden_size")
            q, k, v = qkv_split(arr, cfg.num_heads, cfg.n_kv_heads, cfg.head_dim,
                                cfg.use_contiguous_weight_layout_attention)
            for part, t in (("linear_q", q), ("linear_k", k), ("linear_v", v)):
                out[mf_to_hf(f"{p}{part}.weight", source)] = t
        elif name.endswith("mlp.linear_fc1.weight") and ".experts." not in name:
            p = name[: -len("linear_fc1.weight")]
            g, u = fc1_split(arr, cfg.use_interleaved_weight_layout_mlp)
            out[mf_to_hf(p + "gating.weight", source)] = g
            out[mf_to_hf(p + "hidden.weight", source)] = u
        elif name.endswith("mlp.experts.weight1"):
            p = name[: -len("weight1")]
            w2n = p + "weight2"
            if w2n not in arrays:
                raise CheckpointError(f"{_where(source)}missing tensor '{w2n}' (weight1 and weight2 come together)")
            n, h, im = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
            _shape_check(arr, (n * h, 2 * im), name, source, "num_experts*hidden_size, 2*moe_intermediate_size")
            _shape_check(arrays[w2n], (n * im, h), w2n, source, "num_experts*moe_intermediate_size, hidden_size")
            gates, ups, downs = experts_unstack(arr, arrays[w2n], n)
            layer = _MF_L.match(name).group(1)
            for i in range(n):
                for kind, t in (("gate_proj", gates[i]), ("up_proj", ups[i]), ("down_proj", downs[i])):
                    out[f"model.layers.{layer}.mlp.experts.{i}.{kind}.weight"] = t
        elif name.endswith("mlp.experts.weight2"):
            continue
        else:
            out[mf_to_hf(name, source)] = arr
    return out


def expected_hf_shapes(cfg) -> Dict[str, tuple]:
    """HF name -> shape of every tensor a Qwen3 / Qwen3-MoE checkpoint of `cfg` holds."""
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
                    p + "self_attn.k_proj.weight": (cfg.n_kv_heads * d, h),
                    p + "self_attn.v_proj.weight": (cfg.n_kv_heads * d, h),
                    p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if cfg.is_moe_layer(i):
            im = cfg.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                out.update({f"{p}mlp.experts.{e}.gate_proj.weight": (im, h),
                            f"{p}mlp.experts.{e}.up_proj.weight": (im, h),
                            f"{p}mlp.experts.{e}.down_proj.weight": (h, im)})
        else:
            i_s = cfg.intermediate_size
            out.update({p + "mlp.gate_proj.weight": (i_s, h), p + "mlp.up_proj.weight": (i_s, h),
                        p + "mlp.down_proj.weight": (h, i_s)})
    return out


def check_hf_state(shapes: Dict[str, tuple], cfg, files: Dict[str, str], source: str = ""):
    """Every tensor `cfg` needs is there with its shape, and nothing else: CheckpointError naming the file (from
    `files`, HF name -> file), the tensor and what config.json implies."""
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            what = ("the per-head RMSNorm of Qwen3 attention" if name.endswith(("q_norm.weight", "k_norm.weight"))
                    else "implied by config.json")
            raise CheckpointError(f"{_where(source)}missing tensor '{name}' (expected shape {shape}, {what})")
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(f"{files.get(name, source)}: tensor '{name}': expected shape {shape} from "
                                  f"config.json, found {tuple(shapes[name])}")
    for name in shapes:
        if name not in expected and not is_ignored_hf(name) and not (cfg.tie_word_embeddings and
                                                                     name == "lm_head.weight"):
            hint = ""
            if ".mlp.experts." in name or name.endswith("mlp.gate.weight"):
                hint = (f"; config.json: num_experts {cfg.num_experts}, decoder_sparse_step "
                        f"{cfg.decoder_sparse_step}, mlp_only_layers {cfg.mlp_only_layers}")
            raise CheckpointError(f"{files.get(name, source)}: unexpected tensor '{name}' (not part of the model "
                                  f"config.json describes{hint})")
