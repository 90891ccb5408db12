"""Batched generation with the KV cache and continuous batching: the engine behind `--run_mode serve` and evaluation.

    from mindformers_sft.generation.engine import Engine, SamplingParams
    engine = Engine(model, eos_ids=model.config.eos_token_ids, max_batch=8, max_context=2048)
    outs = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=32))      # new tokens per prompt
    outs = engine.generate(prompts, [SamplingParams(...), ...])                # one SamplingParams per prompt

    engine.start()                                  # a scheduler thread now owns the model
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=1))
    for token_id in req: ...                        # blocking iterator; `async for` with submit(..., loop=loop)
    req.finish_reason                               # 'stop' (eos / stop id), 'length', 'cancelled' or 'error'
    req.cancel()                                    # frees its batch slot at the next step
    engine.stop()

SamplingParams: max_tokens, temperature (<= 0: greedy), top_k (0 = off), top_p (1.0 = off), seed (None: random;
each sequence has its own generator, so a seeded answer does not depend on what it is batched with),
stop_token_ids (besides eos_ids), ignore_eos (always generate max_tokens, as vLLM's). The returned tokens are the
new ones only; a final eos / stop id is included (as in generate.generate).

Prompts of different lengths share one batch: rows are left-padded, each row has its own rotary positions and a
key mask hides the padding (CausalLM.forward_with_cache key_mask / position_ids). Between decode steps waiting
sequences are prefilled together and their caches merged into the running batch; finished rows leave it, and
cache columns that only padding uses are trimmed. Greedy answers equal single-request generation.
The engine never runs the model from two threads: before start() generate() steps in the caller's thread,
after it generate() goes through the scheduler thread.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError
from ..models import decode_graph
from .generate import pick_token

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"
_END = object()


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def check(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")


class Request:
    """One submitted sequence: its new tokens as they are decoded (iterate, or `async for` when submitted with a
    loop), then `finish_reason` ('stop', 'length', 'cancelled', 'error'; `error` holds the message)."""

    def __init__(self, prompt: List[int], params: SamplingParams, loop=None):
        self.prompt, self.params = prompt, params
        self.tokens: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.rng = np.random.default_rng(params.seed)
        self.stop_ids = set(int(t) for t in params.stop_token_ids)
        self._cancelled = False
        self._loop = loop
        self._queue = asyncio.Queue() if loop is not None else None
        self._sync = collections.deque()
        self._ready = threading.Condition()

    def cancel(self):
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _push(self, item):
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:        # the loop is closed: nobody listens any more
                self._cancelled = True
            return
        with self._ready:
            self._sync.append(item)
            self._ready.notify_all()

    def _emit(self, token: int):
        self.tokens.append(token)
        self._push(token)

    def _finish(self, reason: str, error: str = None):
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._push(_END)

    def __iter__(self):
        while True:
            with self._ready:
                while not self._sync:
                    self._ready.wait()
                item = self._sync.popleft()
            if item is _END:
                return
            yield item

    async def __aiter__(self):
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            yield item


class Engine:
    def __init__(self, model, eos_ids=None, max_batch: int = 8, max_context: Optional[int] = None):
        if eos_ids is None:
            eos_ids = model.config.eos_token_ids
        self.model = model
        self.eos = set(int(e) for e in ([eos_ids] if isinstance(eos_ids, int) else eos_ids))
        self.max_batch = int(max_batch)
        mc = model.config
        self.max_context = int(max_context or mc.seq_length or mc.max_position_embedding or 2048)
        self._waiting = collections.deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.cancelled = 0        # sequences cancelled before they finished (clients that went away, stop strings)
        self._reset()

    def _reset(self):
        self.rows: List[Request] = []     # running sequences, in batch order
        self.cache = None                 # KVCache (B, Nkv, T, D) per layer (T = its length), rows right-aligned
        self.key_mask = np.zeros((0, 0), dtype=bool)   # (B, T): True where a row has a real token
        self.next_pos = np.zeros(0, dtype=np.int32)    # rotary position of each row's next token
        self.last = np.zeros(0, dtype=np.int32)        # each row's last token, fed to the next decode step

    # ---- public API ----
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams = None, loop=None) -> Request:
        params = params or SamplingParams()
        params.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ConfigError("prompt: needs at least one token")
        if len(prompt) >= self.max_context:
            raise ConfigError(f"prompt: {len(prompt)} tokens; the context holds {self.max_context} "
                              "(prompt + at least one new token)")
        req = Request(prompt, params, loop)
        with self._lock:
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> List[List[int]]:
        """New tokens for each prompt (in order), batched and continuously refilled up to max_batch rows."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        if self._thread is None:
            while any(r.finish_reason is None for r in reqs):
                self.step()
        for r in reqs:
            for _ in r:
                pass
            if r.finish_reason == FINISH_ERROR:
                raise RuntimeError(f"generation failed: {r.error}")
        return [r.tokens for r in reqs]

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="engine-scheduler", daemon=True)
            self._thread.start()

    def stop(self):
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
            self._thread.join()
            self._thread = None

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self._waiting), "max_batch": self.max_batch,
                "cancelled": self.cancelled}

    # ---- scheduling ----
    def _serve(self):
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.rows:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:     # a failing step fails its sequences; the engine keeps serving
                msg = f"{type(e).__name__}: {e}"
                for r in self.rows:
                    r._finish(FINISH_ERROR, msg)
                self._reset()
        for r in self.rows + list(self._waiting):
            r._finish(FINISH_CANCELLED)

    def step(self):
        """Admit waiting sequences (prefill), then one decode step for every running row."""
        self._drop(lambda r: r.cancelled, FINISH_CANCELLED)
        with self._lock:
            new = []
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                r = self._waiting.popleft()
                if r.cancelled:
                    r._finish(FINISH_CANCELLED)
                    self.cancelled += 1
                else:
                    new.append(r)
        if new:
            self._prefill(new)
        if self.rows:
            self._decode()

    def _prefill(self, new: List[Request]):
        lens = [len(r.prompt) for r in new]
        graph = decode_graph.enabled()
        # the compiled prefill takes a few widths (left padding the key mask hides), so its graphs are reused
        width = decode_graph.prefill_width(max(lens)) if graph else max(lens)
        ids = np.zeros((len(new), width), dtype=np.int32)
        mask = np.zeros((len(new), width), dtype=bool)
        for i, r in enumerate(new):
            ids[i, width - lens[i]:] = r.prompt
            mask[i, width - lens[i]:] = True
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        logits, cache = self.model.forward_with_cache(ids, None, key_mask=mask, position_ids=positions, last_only=True)
        last = logits.asnumpy()[:, -1].astype(np.float32)
        mask = mask[:, width - cache.length:]      # a prefill may drop leading columns that only padding uses
        self._merge(new, cache, mask, np.array(lens, dtype=np.int32))
        self._advance(last, first=len(self.rows) - len(new))

    def _decode(self):
        b = len(self.rows)
        self.key_mask = np.concatenate([self.key_mask, np.ones((b, 1), dtype=bool)], 1)
        logits, self.cache = self.model.forward_with_cache(self.last.reshape(b, 1), self.cache, key_mask=self.key_mask,
                                                           position_ids=self.next_pos.reshape(b, 1))
        self.next_pos = self.next_pos + 1
        self._advance(logits.asnumpy()[:, -1].astype(np.float32), first=0)

    def _advance(self, logits: np.ndarray, first: int):
        """Pick the next token of rows first.. from their logits (one row each), emit it, retire finished rows."""
        for j, row in enumerate(logits):
            i = first + j
            r = self.rows[i]
            p = r.params
            tok = pick_token(row, p.temperature, p.top_k, p.top_p, r.rng)
            self.last[i] = tok
            r._emit(tok)
            if (tok in self.eos and not p.ignore_eos) or tok in r.stop_ids:
                r._finish(FINISH_STOP)
            elif len(r.tokens) >= p.max_tokens or len(r.prompt) + len(r.tokens) >= self.max_context:
                r._finish(FINISH_LENGTH)
        self._drop(lambda r: r.finish_reason is not None or r.cancelled, FINISH_CANCELLED)

    # ---- the batch's cache ----
    def _merge(self, new, cache, mask, lens):
        """Append prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if self.cache is None:
            self.cache, self.key_mask = cache, mask
        else:
            width = max(self.key_mask.shape[1], mask.shape[1])
            self.cache = self.cache.merge_rows(cache, width)
            self.key_mask = np.concatenate([_left_pad_np(self.key_mask, width), _left_pad_np(mask, width)], 0)
        self.rows = self.rows + list(new)
        self.next_pos = np.concatenate([self.next_pos, lens]).astype(np.int32)
        self.last = np.concatenate([self.last, np.zeros(len(new), np.int32)])

    def _drop(self, gone, reason):
        """Remove rows for which gone(row) holds (finishing them with `reason` if not finished yet)."""
        keep = [i for i, r in enumerate(self.rows) if not gone(r)]
        if len(keep) == len(self.rows):
            return
        for i, r in enumerate(self.rows):
            if i not in keep and r.finish_reason is None:
                r._finish(reason)
                self.cancelled += reason == FINISH_CANCELLED
        if not keep:
            self._reset()
            return
        mask = self.key_mask[keep]
        start = int(np.argmax(mask.any(0)))       # leading columns that only padding uses are trimmed
        self.cache = self.cache.take_rows(keep, start)
        self.key_mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]
        self.next_pos, self.last = self.next_pos[keep], self.last[keep]


def _left_pad_np(mask, width):
    return np.concatenate([np.zeros((mask.shape[0], width - mask.shape[1]), dtype=bool), mask], 1)
