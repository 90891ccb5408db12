"""Our model as an lm-evaluation-harness 0.4 backend, registered as `mindformers_sft`.

    python -m mindformers_sft.evaluation.lm_eval_cli --model mindformers_sft \
        --model_args config=configs/stories260k/lora_stories260k.yaml,load_checkpoint=OUTPUT/checkpoint --tasks ...
    python run_mindformer.py --config ... --run_mode eval --load_checkpoint ... --tasks alpaca_mc,tinystories_ppl

model_args: `config` (our YAML), `load_checkpoint` (any checkpoint form run_mindformer.py takes; LoRA adapters
with the YAML's pet_config), `pretrained` (a Hugging Face directory, same as load_checkpoint without a YAML),
`vocab_file`, `register_path`, `options` (space-separated `key=value` YAML overrides), `seed`, `max_length`,
`max_gen_toks`, `add_bos_token`, `prefix_token_id`, `logits_cache`; `batch_size` comes from lm-eval's flag.

The numerics follow lm-eval's Hugging Face backend (lm_eval/models/huggingface.py, HFLM) step by step:
context/continuation split by encoding context+continuation (TemplateLM._encode_pair), requests sorted by
descending length and batched with RIGHT padding (causal attention: a row's positions never see the padding
after it), inputs truncated from the left to `max_length` (+1), log-softmax over fp32 logits, is_greedy from the
argmax, rolling windows from lm_eval.utils.get_rolling_token_windows/make_disjoint_window, generation left-
truncated to `max_length - max_gen_toks` and cut at the `until` strings. Every left truncation is counted in
`self.truncations` (and logged), as HFLM warns about it.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry imports them only while empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from ..errors import ConfigError

log = logging.getLogger("mindformers_sft.evaluation")

DEFAULT_MAX_LENGTH = 2048    # HFLM._DEFAULT_MAX_LENGTH


class _Logits(np.ndarray):
    """(1, seq, vocab) log-probs with the two torch methods lm-eval's Collator.get_cache calls on a cache hit."""

    def expand(self, n, *_):
        return np.broadcast_to(self, (n,) + self.shape[1:]).view(_Logits)

    def chunk(self, n):
        return [self[i:i + 1] for i in range(n)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _batch_size(value) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return 8     # no memory probing on a host: a fixed batch
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size: expected a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {n}")
    return n


def build_from_config(config=None, load_checkpoint=None, vocab_file=None, register_path=None, options=None,
                      seed=None, device=None):
    """(model, tokenizer) as run_mindformer.py --run_mode eval builds them (context set up, weights loaded)."""
    from .. import build
    from ..config import load_config
    if register_path:
        build.register(register_path)
    target = {"cpu": "CPU", "npu": "Ascend", "ascend": "Ascend"}.get(str(device).split(":")[0].lower()) \
        if device else None
    overrides = {"run_mode": "eval", "use_parallel": False, "load_checkpoint": load_checkpoint,
                 "processor.tokenizer.vocab_file": vocab_file, "seed": seed, "context.device_target": target}
    opts = options.split() if isinstance(options, str) else list(options or [])
    cfg = load_config(config, opts, overrides)
    build.setup_context(cfg)
    from ..pretrained import resolve_pretrained
    resolve_pretrained(cfg, log.info)          # MindFormers 1.6+ pretrained_model_dir
    model = build.build_model(cfg, 0, log=log.info)
    return model, build.check_tokenizer(cfg, model.config)


@register_model("mindformers_sft", "mindformers-sft")
class MindFormersLM(TemplateLM):
    """lm-eval LM over our LlamaForCausalLM (any family built by run.build_model) and our tokenizer."""

    backend = "causal"

    def __init__(self, config=None, load_checkpoint=None, pretrained=None, vocab_file=None, register_path=None,
                 options=None, seed=1234, batch_size=1, max_batch_size=None, device=None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, add_bos_token: Optional[bool] = None,
                 prefix_token_id: Optional[int] = None, logits_cache: bool = True, model=None, tokenizer=None,
                 **unknown):
        super().__init__()
        if unknown:
            known = ("config", "load_checkpoint", "pretrained", "vocab_file", "register_path", "options", "seed",
                     "batch_size", "max_length", "max_gen_toks", "add_bos_token", "prefix_token_id", "logits_cache")
            raise ConfigError(f"mindformers_sft model_args: unknown argument(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(known)}")
        if model is None:
            if load_checkpoint is None:
                load_checkpoint = pretrained
            if config is None and load_checkpoint is None:
                raise ConfigError("mindformers_sft model_args: give config=YAML and/or load_checkpoint=PATH "
                                  "(or pretrained=HF_DIR)")
            model, tokenizer = build_from_config(config, load_checkpoint, vocab_file, register_path, options,
                                                 seed, device)
        elif tokenizer is None:
            raise ConfigError("MindFormersLM(model=...) needs tokenizer= too")
        model.set_train(False)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size_per_gpu = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_cache = bool(logits_cache)
        self.seed = seed
        self.truncations = {"loglikelihood": 0, "generate_until": 0}
        self._bos_text = self.tokenizer.decode([self.prefix_token_id]) if self.prefix_token_id is not None else None

    # ---- what HFLM exposes ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """As HFLM's resolve_max_length: explicit, else the model's max_position_embeddings, else the
        tokenizer's model_max_length, else 2048."""
        if self._max_length:
            return self._max_length
        mc = self.model.config
        for v in (getattr(mc, "max_position_embedding", None), self.tokenizer.model_max_length):
            if v and v < 10 ** 12:
                return int(v)
        return DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": int(sum(p.size for p in self.model.get_parameters())),
                "model_dtype": getattr(self.model.config, "compute_dtype", None)}

    # ---- tokens ----
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list:
        """HFLM.tok_encode: the tokenizer's special tokens (bos) unless told otherwise or the text already
        starts with the bos text."""
        if add_special_tokens is None:
            add = True if self.add_bos_token is None else bool(self.add_bos_token)
            if self._bos_text and string.startswith(self._bos_text):
                add = False
        else:
            add = bool(add_special_tokens)
        ids = list(self.tokenizer.encode(string, add_special_tokens=add))
        bos = self.tokenizer.bos_token_id
        if add and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _model_logprobs(self, rows: list) -> np.ndarray:
        """log-softmax of the logits of right-padded rows: (B, longest, vocab) fp32."""
        from mindspore import Tensor
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)      # HFLM pads with 0 too (pad_and_concat)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        logits = self.model.logits(Tensor(ids)).asnumpy().astype(np.float32)
        return log_softmax(logits)

    # ---- loglikelihood ----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        res = []
        limit = self.max_length
        for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
            rows = []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ConfigError("loglikelihood request with an empty context or continuation after "
                                      "tokenization")
                if len(cont) > limit:
                    raise ConfigError(f"a continuation of {len(cont)} tokens does not fit max_length {limit} (the "
                                      "model's context); nothing can be scored: raise max_length or shorten it")
                if len(ctx) + len(cont) > limit + 1:
                    self.truncations["loglikelihood"] += 1
                    log.warning(f"context ({len(ctx)}) + continuation ({len(cont)}) tokens exceed max_length "
                                f"{limit}: truncating {len(ctx) + len(cont) - limit - 1} tokens from the left")
                rows.append((ctx + cont)[-(limit + 1):][:-1])
            logp = self._model_logprobs(rows)
            for (req_str, ctx, cont), row, lp in zip(chunk, rows, logp):
                inplen, contlen = len(row), len(cont)
                cont_lp = lp[inplen - contlen:inplen][None].view(_Logits)      # (1, contlen, vocab)
                greedy = cont_lp.argmax(-1)
                for req_s, cont_toks, lg in re_ord.get_cache(req_str=req_str, cxt_toks=ctx, cont_toks=cont,
                                                             logits=cont_lp):
                    n = len(cont_toks)
                    is_greedy = bool((greedy[:, -n:] == np.asarray(cont_toks)[None]).all())
                    picked = np.take_along_axis(np.asarray(lg)[0, -n:], np.asarray(cont_toks)[:, None], 1)
                    answer = (float(picked.astype(np.float64).sum()), is_greedy)
                    res.append(answer)
                    if req_s is not None:
                        self.cache_hook.add_partial("loglikelihood", req_s, answer)
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            w = [(None,) + lm_utils.make_disjoint_window(x) for x in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += w
            counts.append(len(w))
        scores = []
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i:i + self.batch_size]
            scores += [s for s, _ in self._loglikelihood_tokens(batch, override_bs=len(batch))]
        out, pos = [], 0
        for req, n in zip(requests, counts):
            out.append(float(sum(scores[pos:pos + n])))
            pos += n
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), out[-1])
        return out

    # ---- generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        from .generation import GenerationSettings, generate_texts
        re_ords = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res = []
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, kwargs = zip(*chunk)
            settings = GenerationSettings.from_lm_eval(kwargs[0], self.max_gen_toks, eos_text, self.seed)
            max_ctx = self.max_length - settings.max_new_tokens
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks {settings.max_new_tokens} must be less than max_length "
                                  f"{self.max_length}")
            prompts = []
            for c in contexts:
                ids = self.tok_encode(c)
                if len(ids) > max_ctx:
                    self.truncations["generate_until"] += 1
                    log.warning(f"prompt of {len(ids)} tokens exceeds max_length {self.max_length} - max_gen_toks "
                                f"{settings.max_new_tokens}: keeping its last {max_ctx} tokens")
                prompts.append(ids[-max_ctx:])
            texts = generate_texts(self.model, self.tokenizer, prompts, settings)
            for ctx, kw, text in zip(contexts, kwargs, texts):
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, kw), text)
        return re_ords.get_original(res)
