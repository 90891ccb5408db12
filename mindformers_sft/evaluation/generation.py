"""Batched text generation for evaluation: settings from lm-eval's gen_kwargs or our flags, texts cut at stop
strings. Uses the batched KV-cache engine (generation/engine.py, prompts of different lengths in one batch)
when present, else generation.generate (one batch per prompt length)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

from ..errors import ConfigError


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    until: List[str] = field(default_factory=list)
    seed: Optional[int] = None

    @classmethod
    def from_lm_eval(cls, gen_kwargs: dict, default_max: int, eos_text: Optional[str], seed) -> "GenerationSettings":
        """lm-eval's generation_kwargs as HFLM reads them (normalize_gen_kwargs + handle_stop_sequences):
        max_gen_toks (or max_new_tokens / max_tokens), until (str or list, eos text appended), do_sample
        (default: temperature > 0), temperature, top_k, top_p."""
        if not isinstance(gen_kwargs, dict):
            raise ConfigError(f"generation_kwargs: expected a dict, got {type(gen_kwargs).__name__}")
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        n = next((kw.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                  if kw.get(k) is not None), default_max)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        do_sample = kw.get("do_sample")
        do_sample = temperature > 0.0 if do_sample is None else bool(do_sample)
        return cls(max_new_tokens=int(n), do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                   top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 1.0), until=until, seed=seed)


def cut_at_stops(text: str, until) -> str:
    """The text before the first occurrence of each stop string, in turn (lm-eval's postprocess)."""
    for term in until or ():
        if term:
            text = text.split(term)[0]
    return text


def generate_ids(model, prompts: List[List[int]], s: GenerationSettings, eos, max_batch: Optional[int] = None,
                 stopped: Optional[Callable[[List[int]], bool]] = None) -> List[List[int]]:
    """The new token ids after each prompt (eos included when reached). With the batched engine, up to
    `max_batch` rows decode together (refilled as rows finish) and a row is finished early once
    `stopped(its new tokens)` says so (a stop string appeared); without it, generation.generate."""
    try:
        from ..generation.engine import Engine, SamplingParams
    except ImportError:
        Engine = None
    if Engine is None:
        from ..generation.generate import generate
        full = generate(model, prompts, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_token_id=eos, seed=s.seed)
        return [seq[len(p):] for p, seq in zip(prompts, full)]
    engine = Engine(model, eos_ids=eos, max_batch=max_batch or max(1, len(prompts)),
                    max_context=max(len(p) for p in prompts) + s.max_new_tokens + 1)
    reqs = [engine.submit(p, SamplingParams(max_tokens=s.max_new_tokens,
                                            temperature=s.temperature if s.do_sample else 0.0,
                                            top_k=s.top_k, top_p=s.top_p,
                                            seed=None if s.seed is None else int(s.seed) + i))
            for i, p in enumerate(prompts)]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
        if stopped is not None:
            for r in reqs:
                if r.finish_reason is None and not r.cancelled and stopped(r.tokens):
                    r.cancel()
    return [list(r.tokens) for r in reqs]


def generate_texts(model, tok, prompts: List[List[int]], s: GenerationSettings,
                   max_batch: Optional[int] = None) -> List[str]:
    """Decoded continuations (special tokens skipped) cut at the stop strings."""
    eos = list(model.config.eos_token_ids) if hasattr(model.config, "eos_token_ids") else None
    stopped = None
    if s.until:
        def stopped(ids):
            text = tok.decode(ids, skip_special_tokens=True)
            return any(t and t in text for t in s.until)
    outs = generate_ids(model, prompts, s, eos, max_batch, stopped)
    return [cut_at_stops(tok.decode(o, skip_special_tokens=True), s.until) for o in outs]
