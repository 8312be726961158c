"""In-process JAX sampler: batched prefill + chunked `while_loop` decode over a static KV cache,
with a prefix cache that keeps each trajectory's KV rows across calls.

Shapes are bucketed (batch, cached prefix, new prompt tokens, new tokens), so each bucket
compiles once and a call never recompiles. A row's slots hold, in order: the KV of its cached
prefix right-aligned to slot A, its new prompt tokens left-padded to end at slot A + L, then the
generated tokens, with any slots left over from rounding the total up to `cache_multiple` at
the end (the decode loop compiles per (batch, slots), and a rollout's turns meet many sums);
positions are per row and a slot mask hides the gaps, so every row writes the same cache slot
each step. Decoding runs on device in chunks of `chunk_steps`; between chunks
the host decodes the new text and ends rows whose stop string was split across tokens in a way
the on-device check (stop ids, tokens containing a stop string, the stop string's own
tokenisation as a suffix) did not see. Batches without stop strings decode in one chunk.

Prefix cache: after each call every row's KV (prompt + completion) is compacted into a row of a
device pool (`prefix_cache_rows` x `prefix_cache_len` slots, least recently used rows evicted).
A later request whose prompt starts with a stored sequence (the next turn of a multi-turn
rollout: the same context plus a tool result) prefills only its new tokens on top of that KV.
Lookup is by token prefix, like a radix cache, so callers pass nothing extra; `release(contexts)`
frees the rows of finished trajectories. `update_params` clears the pool (the KV is stale).

Returned logprobs are the model's log-softmax at temperature 1 (what a trainer recomputes),
whatever temperature was used to sample.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autotraj_jax import sharding as shd
from autotraj_jax.engine.backend import Completion, GenerationRequest, find_stop, prompt_too_long
from autotraj_jax.engine.decode_step import (
  decode_weights,
  merge_heads,
  prefill_forward,
  rope_table,
  split_heads,
  step_forward,
)
from autotraj_jax.engine.prefix_cache import PrefixIndex, pool_rows
from autotraj_jax.engine.sampling import pick_tokens
from autotraj_jax.models.config import ModelConfig
from autotraj_jax.models.decoder import LayerCache

MAX_STOP_SEQS = 8   # stop strings per request checked on device
MAX_STOP_LEN = 8    # tokens per stop string checked on device (longer: host check only)
_NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
  new_token_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
  # New prompt tokens on top of a cached prefix (a tool result and the turn's last token): coarse,
  # since each (batch, prefix, new) bucket compiles a prefill (~1.5 s for the demo model on CPU)
  # and padding a few tool-result tokens costs far less.
  extend_buckets: tuple[int, ...] = (128, 512, 1024, 2048, 4096)
  chunk_steps: int = 32
  # The decode loop's KV slots (cached prefix + new prompt + new tokens) rounded up to a multiple
  # of this, so calls whose prefix and prompt buckets differ share one compiled decode loop (a
  # multi-turn rollout meets many such sums); 1: exact.
  cache_multiple: int = 128
  seed: int = 0
  # Prefix cache: rows kept across calls (0: off) and token slots per row; a context longer
  # than `prefix_cache_len` keeps its first `prefix_cache_len` tokens. A row takes
  # len x layers x 2 x kv_heads x head_dim x dtype bytes; rows beyond `prefix_cache_mb` are dropped.
  prefix_cache_rows: int = 64
  prefix_cache_len: int = 1024
  prefix_cache_mb: int = 2048
  # A shared prefix shorter than this is recomputed (not worth another compiled shape).
  prefix_min_match: int = 32

  def __post_init__(self):
    for name in ("batch_buckets", "prompt_buckets", "new_token_buckets", "extend_buckets"):
      b = getattr(self, name)
      if not b or list(b) != sorted(b) or b[0] <= 0:
        raise ValueError(f"EngineConfig.{name} must be ascending positive sizes, got {b}")
    for name in ("chunk_steps", "cache_multiple"):
      if getattr(self, name) <= 0:
        raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("prefix_cache_rows", "prefix_cache_mb"):
      if getattr(self, name) < 0:
        raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("prefix_cache_len", "prefix_min_match"):
      if getattr(self, name) <= 0:
        raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")


def _bucket(n: int, buckets: Sequence[int], what: str, flag: str) -> int:
  i = bisect.bisect_left(buckets, n)
  if i == len(buckets):
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}; raise engine.{flag}")
  return buckets[i]


# -- sampling ------------------------------------------------------------------------------



@dataclasses.dataclass
class _Plan:
  """Per batch row: pool row read, cached tokens used, pool row written (rows: none)."""
  read: list[int]
  cached: list[int]
  write: list[int]


class JaxEngine:
  """`LLMBackend` over a Flax `CausalLM` held in this process (on several hosts: its part of it,
  so every process calls `generate` with the same requests; `to_host` gathers what they read)."""

  collective = True

  def __init__(self, graphdef: nnx.GraphDef, params: Any, model_cfg: ModelConfig, tokenizer, *,
               mesh: Mesh | None = None, config: EngineConfig = EngineConfig()):
    self.graphdef, self.params, self.model_cfg = graphdef, params, model_cfg
    self.tokenizer, self.mesh, self.config = tokenizer, mesh, config
    self.eos_ids = tuple(sorted({i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id)
                                 if i is not None} if tokenizer.eos_token_id is not None else set()))
    self.vocab_size = model_cfg.vocab_size
    self._token_text: list[str] | None = None
    self._stop_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._tables: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    self._batch_tables: dict[tuple, tuple[jax.Array, jax.Array, jax.Array]] = {}
    self.num_compiles = 0
    self._rng = np.random.default_rng(config.seed)
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("cached_len", "cache_len", "num_new"))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
    self._store = jax.jit(self._store_fn, donate_argnums=(0,))
    self._batch_multiple = 1 if mesh is None else math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    rows = pool_rows(model_cfg, config)
    if rows >= self._batch_multiple:  # rows split evenly over the mesh's batch axes, not copied to every device
      rows -= rows % self._batch_multiple
    self._index = PrefixIndex(rows, config.prefix_cache_len) if rows else None
    self._pool: list[LayerCache] | None = None
    self.reset_stats()

  # -- weights, cache, counters ------------------------------------------------------------

  def update_params(self, params: Any) -> None:
    """Take new weights (same shapes, dtypes and shardings): no recompilation. The prefix cache
    is emptied: its KV was computed by the old weights."""
    old = jax.tree.structure(self.params)
    if jax.tree.structure(params) != old:
      raise ValueError("update_params needs a param tree with the same structure as the engine's")
    self.params = params
    self.clear_prefix_cache()

  def clear_prefix_cache(self) -> None:
    if self._index is not None:
      self._index.clear()

  def release(self, contexts: Sequence[Sequence[int]]) -> int:
    """Free the prefix-cache rows of finished sequences (each row whose tokens are a prefix of
    one of `contexts`); how many rows were freed. Unknown contexts are ignored."""
    if self._index is None:
      return 0
    return sum(self._index.release(c) for c in contexts if len(c))

  def reset_stats(self) -> None:
    self.context_tokens = 0   # prompt tokens of every request served
    self.prefill_tokens = 0   # of those, the ones the model computed (the rest came from the cache)

  @property
  def prefill_ratio(self) -> float:
    """Prefill tokens computed / context tokens seen since the last `reset_stats` (1.0: no reuse)."""
    return self.prefill_tokens / max(self.context_tokens, 1)

  # -- jitted pieces -----------------------------------------------------------------------

  def _constrain(self, x, spec):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _prefill_fn(self, params, pool, tokens_BL, valid_BL, cached_B, rows_B, const, expand_B, *, cached_len: int,
                  cache_len: int, num_new: int):
    """Prefill the new tokens on top of each row's cached prefix (gathered from the pool into
    slots [cached_len - cached_B, cached_len)); returns the decode state. `expand_B` (None: the
    identity) gives each decode row the prefilled row it starts from, so identical prompts (the
    samples of one question) are prefilled once."""
    self.num_compiles += 1
    model = nnx.merge(self.graphdef, params)
    R, L = tokens_BL.shape  # prefilled rows
    A, S = cached_len, cache_len
    cfg = self.model_cfg
    slots = jnp.arange(S)[None, :]
    if pool is None:
      prefix = None
      prefix_valid = jnp.zeros((R, S), bool)
    else:
      Sp = pool[0].k.shape[3]
      src = jnp.clip(jnp.arange(A)[None, :] - (A - cached_B[:, None]), 0, Sp - 1)  # [B, A]
      heads = jnp.arange(cfg.num_kv_heads)[None, :, None]
      take = lambda a: a[rows_B[:, None, None], heads, :, src[:, None, :]]  # [B, K, A, H]
      prefix = [LayerCache(take(c.k), take(c.v)) for c in pool]
      prefix_valid = (slots >= A - cached_B[:, None]) & (slots < A)
    new_valid = jnp.zeros((R, S), bool).at[:, A:A + L].set(valid_BL.astype(bool))
    slot_valid = prefix_valid | new_valid
    positions = cached_B[:, None] + jnp.maximum(jnp.cumsum(valid_BL, axis=-1) - 1, 0)
    mask = slot_valid[:, None, :A + L] & (slots[:, :A + L] <= A + jnp.arange(L)[:, None])[None]
    logits, cache = prefill_forward(model, tokens_BL, positions, mask, prefix, S)
    if expand_B is not None:
      take_rows = lambda a: jnp.take(a, expand_B, axis=0)
      logits, slot_valid, positions = take_rows(logits), take_rows(slot_valid), take_rows(positions)
      cache = [type(c)(*(take_rows(a) for a in c)) for c in cache]
    B = logits.shape[0]
    cache = [type(c)(*(self._constrain(a, P(shd.BATCH_AXES, None, None, None)) for a in c)) for c in cache]
    T = num_new
    return {"i": jnp.zeros((), jnp.int32), "t": jnp.zeros((), jnp.int32), "tokens": jnp.zeros((B, T), jnp.int32),
            "logprobs": jnp.zeros((B, T), jnp.float32), "window": jnp.full((B, MAX_STOP_LEN), -1, jnp.int32),
            "done": jnp.arange(B) >= const["rows"], "slot_valid": slot_valid, "pos": positions[:, -1] + 1,
            "cache": cache, "logits": logits, "length": jnp.zeros((B,), jnp.int32)}

  def _decode_fn(self, params, state, const):
    """Up to `const['chunk']` decode steps inside one while_loop; `state` is donated."""
    self.num_compiles += 1
    model = nnx.merge(self.graphdef, params)
    T = state["tokens"].shape[1]
    seqs, lens = const["stop_seqs"], const["stop_lens"]  # [B, NS, MAX_STOP_LEN] right-aligned, [B, NS]
    # Once per call, outside the loop. Positions never exceed slots, so S positions suffice.
    weights, head = decode_weights(model)
    rope = rope_table(state["slot_valid"].shape[1], self.model_cfg.head_dim, self.model_cfg.rope_theta)

    def cond(s):
      return (s["i"] < const["chunk"]) & (s["t"] < T) & ~jnp.all(s["done"])

    def body(s):
      t = s["t"]
      tok, lp = pick_tokens(s["logits"], t, const)
      active = ~s["done"]
      tok = jnp.where(active, tok, 0)
      n_gen = t + 1
      # On-device stops: stop ids / tokens containing a stop string, and stop-token suffixes.
      window = jnp.concatenate([s["window"][:, 1:], tok[:, None]], axis=1)  # last MAX_STOP_LEN tokens
      match = jnp.all((seqs == window[:, None, :]) | (seqs < 0), axis=-1) & (lens > 0) & (lens <= n_gen)
      hit = jnp.take_along_axis(const["stop_vocab"], tok[:, None], axis=1)[:, 0] | jnp.any(match, axis=-1)
      done = s["done"] | (active & (hit | (n_gen >= const["max_new"])))
      # Feed the token back: one step of the model at slot base + t.
      slot = const["base"] + t
      slot_valid = jax.lax.dynamic_update_slice(s["slot_valid"], jnp.ones((tok.shape[0], 1), bool), (0, slot))
      logits, cache = step_forward(model, weights, head, rope, tok, s["pos"], s["cache"], slot, slot_valid)
      return {**s, "i": s["i"] + 1, "t": n_gen,
              "tokens": jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, t)),
              "logprobs": jax.lax.dynamic_update_slice(s["logprobs"], jnp.where(active, lp, 0.0)[:, None], (0, t)),
              "window": window, "done": done, "slot_valid": slot_valid, "pos": s["pos"] + 1,
              "cache": cache, "logits": logits, "length": jnp.where(active, n_gen, s["length"])}

    B = state["tokens"].shape[0]
    out = jax.lax.while_loop(cond, body, {**state, "i": jnp.zeros((), jnp.int32), "cache": merge_heads(state["cache"])})
    return {**out, "cache": split_heads(out["cache"], B)}

  def _store_fn(self, pool, cache, rows_B, cached_B, new_B, cached_len, num_new_slots):
    """Compact each row's prefix, new prompt tokens and completion into slots [0, n) of pool row
    `rows_B` (out of range: not kept); `pool` is donated and updated in place."""
    self.num_compiles += 1
    S, Sp = cache[0].k.shape[3], pool[0].k.shape[3]  # slot-minor: [B, K, H, S]
    W = min(S, Sp)
    j = jnp.arange(W)[None, :]
    c, n = cached_B[:, None], new_B[:, None]
    src = jnp.where(j < c, cached_len - c + j, cached_len + num_new_slots - n + (j - c))
    src = jnp.clip(src, 0, S - 1)[:, None, None, :]

    def put(p, a):
      return p.at[rows_B, :, :, :W].set(jnp.take_along_axis(a, src, axis=3), mode="drop")

    pool_spec = self._pool_spec()
    keep = (lambda x: x) if pool_spec is None else (lambda x: self._constrain(x, pool_spec))
    return [LayerCache(keep(put(p.k, a.k)), keep(put(p.v, a.v))) for p, a in zip(pool, cache)]

  def _pool_spec(self) -> P | None:
    """The prefix-cache pool's rows sharded like a batch (None: no mesh, or rows that do not split)."""
    if self.mesh is None or self._index is None or self._index.rows % self._batch_multiple:
      return None
    return P(shd.BATCH_AXES, None, None, None)

  # -- host side ---------------------------------------------------------------------------

  def _texts(self) -> list[str]:
    if self._token_text is None:
      self._token_text = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]
    return self._token_text

  def _stop_tables(self, req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stop_vocab [V] bool, stop_seqs [NS, L] right-aligned with -1 pads, stop_lens [NS]); kept
    across calls per (stop strings, stop ids)."""
    key = (req.stop, req.stop_token_ids)
    if key in self._tables:
      return self._tables[key]
    vocab = np.zeros((self.vocab_size,), bool)
    ids = [i for i in (*self.eos_ids, *req.stop_token_ids) if 0 <= i < self.vocab_size]
    vocab[ids] = True
    seqs = np.full((MAX_STOP_SEQS, MAX_STOP_LEN), -1, np.int32)
    lens = np.zeros((MAX_STOP_SEQS,), np.int32)
    for n, s in enumerate(req.stop[:MAX_STOP_SEQS]):
      if s not in self._stop_cache:
        contains = np.array([s in t for t in self._texts()], bool)
        enc = np.asarray(self.tokenizer.encode(s, add_special_tokens=False), np.int32)
        self._stop_cache[s] = (contains, enc)
      contains, enc = self._stop_cache[s]
      vocab |= contains
      if 0 < len(enc) <= MAX_STOP_LEN:
        seqs[n, MAX_STOP_LEN - len(enc):] = enc
        lens[n] = len(enc)
    self._tables[key] = (vocab, seqs, lens)
    return self._tables[key]

  def _device_stop_tables(self, reqs: Sequence[GenerationRequest], B: int):
    """The batch's stop tables on device, kept across calls for the same stop settings per row
    (a rollout sends the same ones every round)."""
    key = (B, tuple((r.stop, r.stop_token_ids) for r in reqs))
    if key not in self._batch_tables:
      tables = [self._stop_tables(r) for r in reqs]
      filler = (np.zeros_like(tables[0][0]), np.full_like(tables[0][1], -1), np.zeros_like(tables[0][2]))
      tables += [filler] * (B - len(reqs))
      if len(self._batch_tables) >= 16:
        self._batch_tables.pop(next(iter(self._batch_tables)))
      self._batch_tables[key] = tuple(jax.device_put(np.stack([t[i] for t in tables])) for i in range(3))
    return self._batch_tables[key]

  def _seeds(self, reqs: Sequence[GenerationRequest], B: int) -> np.ndarray:
    seeds = [r.sampling.seed if r.sampling.seed is not None else int(self._rng.integers(2**31))
             for r in reqs]
    return np.asarray(seeds + [0] * (B - len(reqs)), np.uint32)

  def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """One completion per request. A prompt longer than the largest prompt bucket comes back
    with no tokens and finish_reason "prompt_too_long"; the other requests run as usual."""
    out: list[Completion | None] = [None] * len(requests)
    max_b = self.config.batch_buckets[-1]
    max_prompt = self.config.prompt_buckets[-1]
    fits = []
    for i, r in enumerate(requests):
      if len(r.prompt_ids) > max_prompt:
        out[i] = prompt_too_long(r)
      else:
        fits.append(i)
    if self._index is not None:  # rows this call will reuse outlive the rows it evicts
      for i in fits:
        row, lcp = self._index.match(np.asarray(requests[i].prompt_ids, np.int32))
        if lcp >= self.config.prefix_min_match:
          self._index.touch(row)
    # Similar lengths together keeps padding (and buckets) small.
    order = sorted(fits, key=lambda i: len(requests[i].prompt_ids))
    for start in range(0, len(order), max_b):
      idx = order[start:start + max_b]
      for i, c in zip(idx, self._generate_batch([requests[i] for i in idx])):
        out[i] = c
    return out  # type: ignore[return-value]

  def _plan(self, prompts: Sequence[np.ndarray]) -> _Plan:
    """Which pool row each request reads (and how many of its tokens) and which it writes."""
    n = len(prompts)
    index = self._index
    if index is None:
      return _Plan([0] * n, [0] * n, [0] * n)
    read, cached, write = [0] * n, [0] * n, [-1] * n
    claimed: set[int] = set()
    for b, p in enumerate(prompts):
      row, lcp = index.match(p)
      c = min(lcp, len(p) - 1)  # at least one token to prefill: its logits start the decode
      if c >= self.config.prefix_min_match:
        read[b], cached[b] = row, c
        if lcp == index.lengths[row] and row not in claimed:  # the request extends the row: reuse it
          write[b] = row
          claimed.add(row)
    free = iter(index.least_recent(claimed))
    for b in range(n):
      if write[b] < 0:
        write[b] = next(free, index.rows)  # none left: this row's KV is not kept
        claimed.add(write[b])
    return _Plan(read, cached, write)

  def _batch_bucket(self, rows: int) -> int:
    """The padded batch of `rows` rows: a multiple of the mesh's batch shards, then a bucket."""
    m = self._batch_multiple
    return _bucket(-(-rows // m) * m, self.config.batch_buckets, "batch", "batch_buckets")

  def _generate_batch(self, reqs: Sequence[GenerationRequest]) -> list[Completion]:
    cfg = self.config
    n = len(reqs)
    B = self._batch_bucket(n)
    prompts = [np.asarray(r.prompt_ids, np.int32) for r in reqs]
    plan = self._plan(prompts)
    new = [len(p) - c for p, c in zip(prompts, plan.cached)]
    A = 0 if max(plan.cached) == 0 else _bucket(max(plan.cached), cfg.prompt_buckets, "cached prefix", "prompt_buckets")
    if A and max(new) <= cfg.extend_buckets[-1]:
      L = _bucket(max(new), cfg.extend_buckets, "new prompt tokens", "extend_buckets")
    else:
      L = _bucket(max(new), cfg.prompt_buckets, "prompt length", "prompt_buckets")
    T = _bucket(max(r.sampling.max_new_tokens for r in reqs), cfg.new_token_buckets, "max_new_tokens",
                "new_token_buckets")
    # Identical fresh prompts (the samples of one question) are prefilled once when that takes a
    # smaller batch bucket; `expand` maps each row to its prefilled row. Not on a cached prefix:
    # there identical rows share only a short extension, not worth a prefill shape of its own.
    first: dict[bytes, int] = {}
    source = [first.setdefault(p.tobytes(), len(first)) for p in prompts]
    Bp = self._batch_bucket(len(first))
    expand = None
    if Bp < B and A == 0:
      expand = np.asarray(source + [0] * (B - n), np.int32)
      fill = [source.index(u) for u in range(len(first))]  # the first row of each prompt
    else:
      Bp, fill = B, list(range(n))
    self.context_tokens += sum(len(p) for p in prompts)
    self.prefill_tokens += sum(new[b] for b in fill)
    tokens = np.zeros((Bp, L), np.int32)
    valid = np.zeros((Bp, L), np.int32)
    for i, b in enumerate(fill):
      p, c = prompts[b], plan.cached[b]
      tokens[i, L - len(p) + c:] = p[c:]
      valid[i, L - len(p) + c:] = 1
    valid[len(fill):, -1] = 1  # filler rows: one valid token so softmax is defined
    pad = lambda vals, fill, dtype: np.asarray(list(vals) + [fill] * (B - n), dtype)
    any_stop_strings = any(r.stop for r in reqs)
    stop_vocab, stop_seqs, stop_lens = self._device_stop_tables(reqs, B)
    host = {
        "base": np.int32(A + L),
        "chunk": np.int32(cfg.chunk_steps if any_stop_strings else T),
        "seeds": self._seeds(reqs, B),
        "temperature": pad((r.sampling.temperature for r in reqs), 0.0, np.float32),
        "top_p": pad((r.sampling.top_p for r in reqs), 1.0, np.float32),
        "top_k": pad((r.sampling.top_k for r in reqs), -1, np.int32),
        "max_new": pad((r.sampling.max_new_tokens for r in reqs), 1, np.int32),
        "any_sample": np.bool_(any(r.sampling.temperature > 0 for r in reqs)),
        "any_filter": np.bool_(any(r.sampling.top_p < 1.0 or r.sampling.top_k > 0 for r in reqs)),
        "rows": np.int32(n),  # real rows; the rest are filler, done from the start
    }
    rows = np.asarray([plan.read[b] for b in fill] + [0] * (Bp - len(fill)), np.int32)
    cached = np.asarray([plan.cached[b] for b in fill] + [0] * (Bp - len(fill)), np.int32)
    const, tokens_d, valid_d, rows_d, cached_d, expand_d = jax.device_put((host, tokens, valid, rows, cached, expand))
    const.update(stop_vocab=stop_vocab, stop_seqs=stop_seqs, stop_lens=stop_lens)
    pool = self._pool if A else None
    state = self._prefill(self.params, pool, tokens_d, valid_d, cached_d, rows_d, const, expand_d,
                          cached_len=A, cache_len=-(-(A + L + T) // cfg.cache_multiple) * cfg.cache_multiple,
                          num_new=T)
    host_stop: dict[int, tuple[int, str]] = {}
    while True:
      state = self._decode(self.params, state, const)
      if not any_stop_strings:
        break  # one chunk ran to the end or until every row stopped
      t, done_h = shd.to_host((state["t"], state["done"]))
      done_h = np.array(done_h)
      # Host-side check for stop strings the device did not see.
      toks_h, lens_h = shd.to_host((state["tokens"], state["length"]))
      for b, r in enumerate(reqs):
        if r.stop and not done_h[b] and b not in host_stop:
          cut = self._stop_cut(toks_h[b, :lens_h[b]].tolist(), r.stop)
          if cut is not None:
            host_stop[b] = cut
            done_h[b] = True
      if host_stop:
        state["done"] = jax.device_put(done_h)
      if done_h.all() or int(t) >= T:
        break
    toks_h, lps_h, lens_h = shd.to_host((state["tokens"], state["logprobs"], state["length"]))
    outs = [self._finish(r, toks_h[b, :lens_h[b]].tolist(), lps_h[b, :lens_h[b]].tolist(), host_stop.get(b))
            for b, r in enumerate(reqs)]
    if self._index is not None:
      self._keep(state["cache"], plan, prompts, outs, B, A, L)
    return outs

  def _keep(self, cache, plan: _Plan, prompts: Sequence[np.ndarray], outs: Sequence[Completion], B: int,
            A: int, L: int) -> None:
    """Write each row's KV (prompt + completion) into its pool row and record its tokens."""
    index = self._index
    if self._pool is None:
      cfg = self.model_cfg
      shape = (index.rows, cfg.num_kv_heads, cfg.head_dim, index.tokens.shape[1])  # slot-minor, as the cache
      spec = self._pool_spec()
      where = None if spec is None else NamedSharding(self.mesh, spec)
      self._pool = [LayerCache(jnp.zeros(shape, cfg.jnp_dtype, device=where), jnp.zeros(shape, cfg.jnp_dtype,
                                                                                     device=where))
                    for _ in range(cfg.num_layers)]
    n = len(prompts)
    rows = np.full((B,), index.rows, np.int32)
    rows[:n] = plan.write
    cached = np.asarray(plan.cached + [0] * (B - n), np.int32)
    new = np.asarray([len(p) - c for p, c in zip(prompts, plan.cached)] + [0] * (B - n), np.int32)
    self._pool = self._store(self._pool, cache, *jax.device_put((rows, cached, new, np.int32(A), np.int32(L))))
    for b, (p, o) in enumerate(zip(prompts, outs)):
      if plan.write[b] < index.rows:
        index.store(plan.write[b], np.concatenate([p, np.asarray(o.token_ids, np.int32)]))

  def _stop_cut(self, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """Smallest prefix of `ids` whose text contains a stop string: (num tokens, stop)."""
    hit = find_stop(self.tokenizer.decode(ids), stops)
    if hit is None:
      return None
    for k in range(1, len(ids) + 1):
      h = find_stop(self.tokenizer.decode(ids[:k]), stops)
      if h is not None:
        return k, h[1]
    return None

  def _finish(self, req: GenerationRequest, ids: list[int], lps: list[float],
              host_cut: tuple[int, str] | None) -> Completion:
    matched = None
    if host_cut is not None:
      ids, lps, matched = ids[:host_cut[0]], lps[:host_cut[0]], host_cut[1]
      reason = "stop"
    elif ids and ids[-1] in (*self.eos_ids, *req.stop_token_ids):
      reason = "eos"
    else:
      cut = self._stop_cut(ids, req.stop) if req.stop else None
      if cut is not None:
        ids, lps, matched, reason = ids[:cut[0]], lps[:cut[0]], cut[1], "stop"
      else:
        reason = "length"
    return Completion(token_ids=ids, logprobs=lps if req.return_logprobs else None,
                      text=self.tokenizer.decode(ids), finish_reason=reason, matched_stop=matched)
