"""Rollout engine: a jitted KV-cache sampler that produces the RL training batch.

One call turns B tokenized prompts into B*n fixed-shape responses with the
per-token log-prob of every sampled token. Design decisions:

* One jitted pure function, `_sample`: a prefill runs the left-padded prompt
  batch through the model once (write index 0) and samples the first response
  token; then `lax.while_loop`s over a pytree `_DecodeState` feed one token per
  row per iteration and exit as soon as every row has stopped. The KV cache is
  created inside the function, so XLA preallocates it and updates it in place
  (nothing crosses the jit boundary that would need donating); only the
  `Rollout` leaves.
* Decode segments: attention costs in proportion to the cache length, so the
  decode loop is split into up to 4 consecutive while loops (`decode_segments`),
  each over a cache just long enough for its steps; the cache grows (one copy)
  between segments. At 64 prompt + 128 new tokens this reads ~22% fewer cache
  slots than one full-length loop; more for long responses.
* The NNX model crosses the jit boundary split: the `GraphDef` is a static
  argument and the parameter `State` a normal one, merged inside. No weights
  are copied, and parameters sharded on the trainer's mesh are used where they
  are.
* Static settings live in `SamplingConfig`, a frozen hashable dataclass passed
  as a static argument: the same settings and shapes never recompile. Prompts
  are left-padded to a length bucket, so a whole run compiles a handful of
  shapes.
* n samples per prompt: the B prompts are prefilled once and the KV cache is
  repeated n times along the batch (prefill costs B, not B*n, rows). Rows of one
  prompt are contiguous: row r belongs to prompt r // n, groups are [B, n].
* Continuous batching (`SamplingConfig.slots` = S < R = B*n rows): the loop
  decodes S slots, not R rows. When a slot's row stops, the slot takes the
  next waiting row: its prompt's K/V is copied from the prompts' own cache
  (the prefill's, kept for the whole call: B x P slots) into the slot, and the
  row's token 0, drawn at prefill, is fed next. Each slot is at its own
  position, so the cached forward writes one position per row
  (`Transformer.forward_cached` with a [S] write index). Shapes are static
  (the refill runs every slot through a `where`, inside a `lax.cond` taken
  only when a slot is free and a row waits), so one program serves any
  schedule. With a mesh, data shard d owns prompts [d B/D, (d+1) B/D), their
  rows and S/D slots, and refills from its own queue: every gather and scatter
  is batched over the shard axis, so no row moves between devices (the loop
  conditions are the only cross-shard reductions; tested on the compiled
  program). The decode segments still apply, by the furthest live row's
  position: a segment ends when that row outgrows its cache, and once the
  refilled rows are all short again the cache is cut back and the segments
  re-run (`_decode_waves`), so each wave of a uniform workload reads the short
  caches a one-shot call reads. The KV
  cache is S x (P + L - 1) slots plus the prompts' B x P, instead of R x
  (P + L - 1); the prompts are prefilled in chunks of about S/n prompts
  (`prefill_chunks`), so the prefill's activations shrink with S too.
  Same result: token i of row r draws with the key fold_in(fold_in(seed, r),
  i) (`token_keys`), never from the loop's step, so the tokens are the
  one-shot sampler's whatever S (up to floating-point ties; tested). What it
  saves: where decoding is compute-bound (CPU at these sizes), the steps the
  one-shot loop spends on stopped rows (`benchmarks/bench_sampler.py
  --ragged` measures useful tokens/s against the one-shot loop). What it does not: the
  attention of a slot still reads its whole cache segment (masked), so on a
  memory-bound accelerator the K/V bytes read per useful token are about the
  one-shot loop's; the gain there is the S-sized cache (a per-row ragged
  attention kernel, e.g. Pallas' GPU `decode_attention`, would read only each
  row's context: not done). `slots >= R` is the one-shot program itself.
* Log-probs: the reported log-prob of a sampled token y is
  log softmax(logits / T)[y] over the FULL vocabulary, before top-k / top-p
  truncation and before the PAD/BOS ban. That is the policy's probability at
  temperature T, the quantity the RL loss compares against, and exactly what
  `entrl.token_stats.token_logprobs_and_entropy(h, W, y, temperature=T)`
  recomputes from a full forward (same float32 math: (h @ W) / T). Greedy
  decoding (T = 0) reports log-probs at T = 1.
* Banned tokens: PAD and BOS (`SamplingConfig.banned_ids`) get logit -inf
  before sampling so a response never contains them mid-sequence, except an id
  that is also an EOS id (Qwen's PAD is its EOS). The sampling distribution is
  therefore the policy's renormalised over the allowed tokens; the reported
  log-prob stays the unrenormalised policy log-prob (previous point), so
  sampler and trainer agree token for token. The difference is the probability
  mass on banned ids, which is tiny for a trained model.
* Order of truncations (as in `transformers`): temperature, then top-k, then
  top-p on the top-k-renormalised distribution. Ties at the cut-off are kept.
  Top-k works on `lax.top_k` values only; top-p without top-k needs one full
  sort of the vocabulary per step.
* Stop handling: a row stops at its first EOS id. The EOS token is part of the
  response (mask 1); every later slot holds PAD with mask 0 and log-prob 0.
  `finish_reason` is "stop" for such rows and "length" for rows that hit
  `max_new_tokens`.
* Sharding: with a mesh, the batch axis of every per-row array (KV cache
  included) is constrained to the mesh's ("data", "fsdp") axes; everything else
  is left to the compiler, driven by the parameters' own shardings
  (Auto axis types), so heads follow the tensor axis as in training.
* Layouts chosen for decode-size batches (benchmarks/bench_sampler.py compares
  them with the alternatives): the unembedding is used as [V, D] in the loop
  (each logit reads one contiguous row), greedy log-probs reuse the max logit
  instead of a gather, and the PAD/BOS ban is a fused `where`, not a scatter.
  The decode loop runs on `Transformer.decode_weights()`, built once per call
  (a copy of the layer weights): q/k/v fused into one matmul, gate/up into
  one, all [out, in]. Attention of the one new token per row uses einsums
  without the T axis over a transposed key cache (`Attention.attend`).
* Left out on purpose: streaming, stop strings (host-side, needs the
  tokenizer), speculative decoding, paged attention, per-row settings
  (temperature etc. are per call), and shrinking the slot batch for the tail
  (the last long rows decode in a batch of mostly idle slots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from entrl import config as C
from entrl.models import DECODE_AXES, K_CACHE_AXES, V_CACHE_AXES, KVCache, Transformer
from entrl.sharding import data_shards, logical_to_spec

__all__ = [
    "DEFAULT_BUCKETS",
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "Rollout",
    "Sampler",
    "SamplingConfig",
    "build_sampler",
    "cache_dtype",
    "choose_bucket",
    "filter_logits",
    "generate",
    "pad_prompts",
    "sample_next_token",
    "slot_layout",
    "special_token_ids",
    "token_keys",
]

_F32 = jnp.float32
#: Prompt-length buckets: prompts are left-padded to the smallest one that fits.
DEFAULT_BUCKETS: tuple[int, ...] = tuple(2**k for k in range(6, 16))  # 64 ... 32768
#: `Rollout.finish_code` values: a row cut at max_new_tokens, or one that emitted a stop id.
FINISH_LENGTH, FINISH_STOP = 0, 1
#: The codes' names (indexed by the code).
FINISH_REASONS: tuple[str, ...] = ("length", "stop")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------
# Static settings
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a jit static argument).

    Validated here, before anything is traced; a bad value is a `ValueError`.
    """

    n: int = 1  # samples per prompt (rows of one prompt are contiguous)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (log-probs then at T = 1)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # keep the k largest logits; 0 = off
    max_new_tokens: int = 256  # response length L (rows that do not stop are cut here)
    eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these (empty = never)
    pad_id: int = 0  # filler after the stop token and in the prompt's left padding
    banned_ids: tuple[int, ...] = ()  # never sampled (PAD/BOS); ids that are also EOS are dropped
    cache_dtype: str = "float32"  # KV-cache dtype: float32 | bfloat16
    segment_steps: int = 32  # min decode steps per KV-cache-length segment (see `decode_segments`)
    slots: int = 0  # rows decoding at once, refilled as rows stop (continuous batching); 0 or >= rows = all at once

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r}: the number of samples per prompt must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an int >= 0 (0 = off)")
        if not is_int(self.segment_steps) or self.segment_steps < 1:
            raise ValueError(f"segment_steps={self.segment_steps!r}: must be an int >= 1")
        if not is_int(self.slots) or self.slots < 0:
            raise ValueError(f"slots={self.slots!r}: must be an int >= 0 (0 = every row at once)")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        for name in ("eos_ids", "banned_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, tuple) or not all(is_int(i) and i >= 0 for i in ids):
                raise ValueError(f"{name}={ids!r}: must be a tuple of non-negative token ids")
        if not is_int(self.pad_id) or self.pad_id < 0:
            raise ValueError(f"pad_id={self.pad_id!r}: must be a non-negative token id")
        if self.cache_dtype not in _DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r}: must be one of {sorted(_DTYPES)}")
        # Normalise so equal settings hash equally (one compilation).
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "eos_ids", tuple(sorted({int(i) for i in self.eos_ids})))
        banned = {int(i) for i in self.banned_ids} - set(self.eos_ids)
        object.__setattr__(self, "banned_ids", tuple(sorted(banned)))

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or top-k = 1 (the same tokens)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the reported log-probs: T, or 1 for greedy T = 0."""
        return self.temperature if self.temperature > 0 else 1.0

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError if a token id in the settings lies outside [0, vocab_size)."""
        for name, ids in (("eos_ids", self.eos_ids), ("banned_ids", self.banned_ids), ("pad_id", (self.pad_id,))):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ValueError(f"{name} {bad} outside the vocabulary [0, {vocab_size})")
        if len(self.banned_ids) >= vocab_size:
            raise ValueError(f"banned_ids {self.banned_ids} leave no token to sample")

    @classmethod
    def for_tokenizer(cls, tokenizer, **settings) -> SamplingConfig:
        """`settings` plus the token ids a tokenizer decides: stop on its stop ids (EOS / end of turn), PAD
        as filler, and the PAD/BOS ban (`special_token_ids`)."""
        return cls(**settings, **special_token_ids(tokenizer.stop_token_ids, tokenizer.pad_token_id,
                                                   tokenizer.bos_token_id))


def special_token_ids(eos_ids, pad_id: int, bos_id) -> dict:
    """`eos_ids`, `pad_id` and `banned_ids` of a `SamplingConfig`: the one place PAD and BOS are banned
    (a response never holds them mid-sequence; an id that is also EOS stays allowed, see the module
    docstring)."""
    banned = {int(pad_id), *_as_id_tuple(bos_id)}
    return {"eos_ids": _as_id_tuple(eos_ids), "pad_id": int(pad_id), "banned_ids": tuple(sorted(banned))}


def cache_dtype(cfg: C.RunConfig, setting: str) -> str:
    """A KV-cache dtype setting of a run config resolved: "auto" is the compute dtype."""
    return cfg.model.dtype if setting == "auto" else setting


def rollout_settings(cfg: C.RunConfig) -> dict:
    """The training rollout's `SamplingConfig` settings (`rollout.*`), token ids aside."""
    r = cfg.rollout
    return dict(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                cache_dtype=cache_dtype(cfg, r.cache_dtype))


def val_settings(cfg: C.RunConfig) -> dict:
    """The periodic evaluation's (`train.eval_every`) sampler settings: `val.*`, the response budget
    `rollout.max_new_tokens` unless `val.max_new_tokens` is set, the rollout's KV-cache dtype. One place
    for the trainer and `entrl plan`."""
    v = cfg.val
    return {**rollout_settings(cfg), "n": v.n, "temperature": v.temperature, "top_p": v.top_p, "top_k": v.top_k,
            **({"max_new_tokens": v.max_new_tokens} if v.max_new_tokens else {})}


def val_batch_prompts(cfg: C.RunConfig) -> int:
    """Problems per sampler call of the periodic evaluation: as many rows as one rollout call decodes
    (`rollout.slots`, else the step's rows), in whole problems of `val.n` samples."""
    rows = cfg.rollout.slots or cfg.train.prompts_per_step * cfg.rollout.n
    return max(1, rows // cfg.val.n)


def annotation_batch_prompts(cfg: C.RunConfig) -> int:
    """Prompts per sampler call of the semantic-entropy annotation inside `entrl train`: a rollout call's
    (the step's prompts, decoded in `rollout.slots` when set). With curriculum.samples == rollout.n the
    annotation then runs the rollout's own program: one compile, and the memory the plan checked."""
    return cfg.train.prompts_per_step


def build_sampler(cfg: C.RunConfig, tokenizer, mesh, *, slots: int = 0, **settings) -> Sampler:
    """A sampler with a run's rollout settings (`rollout_settings`), any of them replaced by `settings`
    (e.g. `n`, or all of `val_settings`), and the tokenizer's token ids (`SamplingConfig.for_tokenizer`).

    `slots`: continuous batching; the training rollout passes `rollout.slots`, the evaluation and
    annotation samplers (other batch shapes) decode every row at once."""
    sc = SamplingConfig.for_tokenizer(tokenizer, **{**rollout_settings(cfg), **settings}, slots=slots)
    return Sampler(sc, mesh=mesh)


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class Rollout:
    """Fixed-shape result of sampling n responses for each of B prompts (R = B*n rows).

    Row r answers prompt `prompt_index[r]` = r // n. Numeric fields are JAX arrays
    (sharded over the batch axes when a mesh was used).
    """

    tokens: jax.Array  # [R, L] int32 response tokens; PAD after the stop token
    mask: jax.Array  # [R, L] int32; 1 for response tokens up to and including the stop token
    logprobs: jax.Array  # [R, L] float32 log softmax(logits / T)[token] (full vocabulary); 0 where masked
    lengths: jax.Array  # [R] int32 response length (= mask.sum(-1))
    finish_code: jax.Array  # [R] int32: FINISH_LENGTH | FINISH_STOP (their names: FINISH_REASONS)
    prompt_index: jax.Array  # [R] int32 which prompt the row answers
    prompt_ids: jax.Array  # [R, P] int32 prompt tokens, left-padded with PAD
    prompt_mask: jax.Array  # [R, P] int32; 1 on real prompt tokens

    @property
    def finish_reason(self) -> np.ndarray:
        """[R] numpy array of "stop" / "length" strings (copies `finish_code` to the host)."""
        return np.asarray(FINISH_REASONS)[np.asarray(self.finish_code)]


# ----------------------------------------------------------------------------
# Sampling strategies on logits (pure)
# ----------------------------------------------------------------------------
def filter_logits(z_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k / top-p set to -inf (ties at a cut-off are kept).

    top-k keeps the k largest; top-p then keeps the smallest prefix of the
    remaining tokens, by decreasing probability, whose probability mass (under
    the softmax renormalised over what top-k kept) reaches `top_p`. The token
    that crosses the threshold is kept, so at least one token always survives.
    With top-k on, top-p works on the k sorted `lax.top_k` values; without it,
    on one full sort.
    """
    vocab = z_BxV.shape[-1]
    k = min(top_k, vocab) if top_k > 0 else 0
    if k == 0 and top_p >= 1.0:
        return z_BxV
    if k > 0:
        sorted_BxK = lax.top_k(z_BxV, k)[0]  # descending
    else:
        sorted_BxK = -jnp.sort(-z_BxV, axis=-1)
    cutoff_B = sorted_BxK[:, -1]
    if top_p < 1.0:
        p_BxK = jax.nn.softmax(sorted_BxK.astype(_F32), axis=-1)
        mass_before_BxK = jnp.cumsum(p_BxK, axis=-1) - p_BxK
        n_keep_B = jnp.sum(mass_before_BxK < top_p, axis=-1)  # >= 1 since top_p > 0
        cutoff_B = jnp.take_along_axis(sorted_BxK, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(z_BxV >= cutoff_B[:, None], z_BxV, -jnp.inf)


def sample_next_token(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row and return (tokens_B int32, logp_B float32).

    rng: one typed PRNG key for the whole batch, or [B] keys, one per row (the
    sampler's: a row's draw then depends only on its own key, not on which
    rows share the batch). logp_B = log softmax(logits / T)[token] over the
    full vocabulary (T = 1 for greedy), computed before the ban and the
    truncations; see the module docstring. Sampling: banned ids -> -inf, then
    argmax (greedy) or top-k/top-p truncation and a categorical draw
    (Gumbel-max) from softmax(z / T).
    """
    z_BxV = logits_BxV.astype(_F32) / cfg.logprob_temperature
    if cfg.banned_ids:  # a where on a constant mask fuses; a scatter would copy the logits
        banned_V = np.zeros(z_BxV.shape[-1], bool)
        banned_V[list(cfg.banned_ids)] = True
        z_allowed_BxV = jnp.where(banned_V, -jnp.inf, z_BxV)
    else:
        z_allowed_BxV = z_BxV
    lse_B = jax.nn.logsumexp(z_BxV, axis=-1)
    if cfg.greedy:
        tokens_B = jnp.argmax(z_allowed_BxV, axis=-1).astype(jnp.int32)
        z_tok_B = jnp.max(z_allowed_BxV, axis=-1)  # the chosen logit, without a gather
    else:
        z_allowed_BxV = filter_logits(z_allowed_BxV, top_k=cfg.top_k, top_p=cfg.top_p)
        if rng.ndim == 0:
            tokens_B = jax.random.categorical(rng, z_allowed_BxV, axis=-1)
        else:
            tokens_B = jax.vmap(lambda key, z_V: jax.random.categorical(key, z_V))(rng, z_allowed_BxV)
        tokens_B = tokens_B.astype(jnp.int32)
        # One index per row, vmapped: a gather batched over rows, so a row-sharded batch gathers locally
        # (a flat 1-D gather into z.reshape(-1) made the partitioner all-gather the indices every step).
        z_tok_B = jax.vmap(lambda z_V, t: z_V[t])(z_BxV, tokens_B)
    logp_B = z_tok_B - lse_B
    return tokens_B, logp_B


def token_keys(rng: jax.Array, rows_B: jax.Array, positions_B: jax.Array) -> jax.Array:
    """[B] keys: response token i of row r draws with fold_in(fold_in(rng, r), i).

    The schedule never enters: whichever slot and decode step produce a token,
    its key is the same, so one-shot and continuous batching sample the same
    responses (`Sampler`).
    """
    return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(rng, r), i))(rows_B, positions_B)


# ----------------------------------------------------------------------------
# Decode loop (pure, jitted)
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class _DecodeState:
    """Carry of the decode `while_loop`: R rows, S slots each decoding one row, D data shards.

    One-shot (S = R): slot r holds row r throughout. Continuous batching
    (S < R): data shard d owns rows [d R/D, (d+1) R/D) and slots
    [d S/D, (d+1) S/D), and refills its slots from its own queue.
    """

    step: jax.Array  # [] int32 decode iterations run + 1 (one-shot: every live row's `pos`; sizes the cache segments)
    tokens: jax.Array  # [R, L] int32 response buffer of every row, PAD-initialised
    logprobs: jax.Array  # [R, L] float32, 0-initialised
    row: jax.Array  # [S] int32 the row each slot decodes
    pos: jax.Array  # [S] int32 response tokens that row has (the next goes to column pos, cache slot P + pos)
    live: jax.Array  # [S] bool: the slot's row is still decoding (False: stopped, or an idle slot)
    last: jax.Array  # [S] int32 the row's last token (fed next)
    prompt_len: jax.Array  # [S] int32 real prompt tokens (RoPE position of response token i is prompt_len + i)
    prompt_mask: jax.Array  # [S, P] int32 the row's prompt mask (left padding 0)
    cache: Any  # the model's KV cache pytree: batch S, the current segment's slots
    queue: jax.Array  # [D, R/D] int32 per shard: its local rows that need decoding first, in row order
    next: jax.Array  # [D] int32 per shard: queue entries handed to slots so far
    count: jax.Array  # [D] int32 per shard: queue entries (rows not stopped by their first token)
    rng: jax.Array  # base key of `token_keys`


def _is_stop(tokens, cfg: SamplingConfig):
    if not cfg.eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(cfg.eos_ids, jnp.int32))


def _shard_view(x, shards: int, mesh, names=None):
    """[N, ...] -> [D, N/D, ...], the leading axis on the data shards (no data moves).

    names: x's logical axes (default: a per-row array, ("batch", None, ...)).
    """
    names = names or ("batch",) + (None,) * (x.ndim - 1)
    x = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
    return _constrain(x, mesh, ("batch", None) + tuple(names[1:]))


def _shard_take(x, index_DxM, mesh, names=None):
    """Rows index_DxM[d] of shard d's rows of x [N, ...] -> [D*M, ...]; a batched gather, local to each shard.

    names: x's logical axes, kept on the result (a KV cache's heads stay on the tensor axis).
    """
    names = names or ("batch",) + (None,) * (x.ndim - 1)
    shards, m = index_DxM.shape
    out = jax.vmap(lambda x_Nx, i_M: x_Nx[i_M])(_shard_view(x, shards, mesh, names), index_DxM)
    return _constrain(out.reshape((shards * m,) + x.shape[1:]), mesh, names)


def _record(state: _DecodeState, tokens_S, logp_S, cfg: SamplingConfig, mesh, continuous: bool) -> _DecodeState:
    """Write each live slot's new token at its row's column `pos`; stopped or idle slots write nothing."""
    live_S = state.live
    tokens_S = jnp.where(live_S, tokens_S, cfg.pad_id)
    logp_S = jnp.where(live_S, logp_S, 0.0)
    if continuous:  # a batched scatter into each shard's own rows; dead slots point past the end (dropped)
        shards, per_shard = state.queue.shape
        local_S = state.row - jnp.repeat(jnp.arange(shards, dtype=jnp.int32) * per_shard, live_S.shape[0] // shards)
        local_DxM = jnp.where(live_S, local_S, per_shard).reshape(shards, -1)
        pos_DxM = state.pos.reshape(shards, -1)

        def write(buf_RxL, new_S):
            put = jax.vmap(lambda b, r, c, v: b.at[r, c].set(v, mode="drop"))
            out = put(_shard_view(buf_RxL, shards, mesh), local_DxM, pos_DxM, new_S.reshape(shards, -1))
            return _rows(out.reshape(buf_RxL.shape), mesh)

        tokens, logprobs = write(state.tokens, tokens_S), write(state.logprobs, logp_S)
    else:  # every live row is at column `step`: one in-place column write
        col = state.step
        tokens = lax.dynamic_update_slice(state.tokens, tokens_S[:, None], (0, col))
        logprobs = lax.dynamic_update_slice(state.logprobs, logp_S[:, None], (0, col))
    pos_S = state.pos + live_S.astype(jnp.int32)
    return state.replace(
        step=state.step + 1, tokens=tokens, logprobs=logprobs, pos=pos_S, last=tokens_S,
        live=live_S & ~_is_stop(tokens_S, cfg) & (pos_S < cfg.max_new_tokens),
    )  # fmt: skip


def _constrain(x, mesh: Mesh | None, names: tuple[str | None, ...]):
    """Pin x to the mesh axes of its logical names (`entrl.sharding` table); no-op without a mesh.

    A mesh axis that does not divide its dimension is dropped (replicated), so
    any batch size runs; a batch that splits evenly over ("data", "fsdp") is
    what makes the sampler data-parallel.
    """
    if mesh is None:
        return x
    return lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, shape=x.shape, mesh=mesh)))


def _rows(x, mesh):
    """Constrain a per-row array (leading batch dimension)."""
    return _constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))


def _logits(h_BxD, w_DxV):
    """Float32 logits h @ W (same contraction as `entrl.token_stats`)."""
    return lax.dot_general(h_BxD, w_DxV, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _logits_vd(h_BxD, w_VxD):
    """Float32 logits h @ W^T for W^T stored [V, D] (each logit reads one contiguous row).

    The layout the decode loop uses (benchmarks/bench_sampler.py compares it with
    [D, V]); the values equal `_logits` up to float32 summation order.
    """
    return lax.dot_general(h_BxD, w_VxD, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def decode_segments(plen: int, max_new_tokens: int, max_segments: int = 4, min_steps: int = 32) -> tuple[tuple[int, int], ...]:
    """Static (end_step, cache_slots) pairs splitting the decode loop by KV-cache length.

    Decode step i (1 <= i < L) feeds response token i-1 at slot P+i-1 and
    attends slots [0, P+i). A segment running the steps before `end` therefore
    needs a cache of P + end - 1 slots, and every step's attention costs in
    proportion to the cache length, so early segments use a shorter cache.
    Up to `max_segments` segments of >= `min_steps` steps each: more segments
    read fewer unused slots, but each compiles its own loop body and grows the
    cache once (one copy). Under continuous batching no row is further along
    than the loop's step count, so the same segments hold; the last one then
    runs on until every row has stopped.
    """
    steps = max_new_tokens - 1
    count = max(1, min(max_segments, steps // min_steps))
    ends = [1 + math.ceil(steps * (j + 1) / count) for j in range(count)]
    return tuple((end, plen + end - 1) for end in ends)


@flax.struct.dataclass
class _Prompts:
    """What refilling a slot needs of the B prompts (loop-invariant)."""

    cache: Any  # KV cache of the prompts alone: batch B, P slots
    mask: jax.Array  # [B, P] int32
    first: jax.Array  # [R] int32 each row's response token 0


def prefill_chunks(cfg: SamplingConfig, batch: int, slots: int, shards: int) -> int:
    """How many sequential chunks the prompts are prefilled in: 1 for the one-shot sampler; under
    continuous batching the fewest that hold about slots / n prompts each (a divisor of each shard's
    prompts), so the prefill's activations scale with the slots, not with the step's prompts."""
    rows = batch * cfg.n
    if slots >= rows:
        return 1
    per_shard = batch // shards
    want = max(1, -(-(slots // shards) // cfg.n))  # prompts per shard per chunk
    return min(k for k in range(1, per_shard + 1) if per_shard % k == 0 and per_shard // k <= want)


def _chunked(x, chunks: int, shards: int):
    """[B, ...] -> [chunks, B/chunks, ...]: chunk i = each shard's i-th block of rows (it spans every shard)."""
    x = x.reshape((shards, chunks, x.shape[0] // (shards * chunks)) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((chunks, x.shape[0] * x.shape[2]) + x.shape[3:])


def _unchunked(x, shards: int):
    """Inverse of `_chunked`."""
    chunks, m = x.shape[:2]
    x = x.reshape((chunks, shards, m // shards) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((chunks * m,) + x.shape[3:])


def _prefill(model: Transformer, weights, w_VxD, prompt_ids_BxP, mask_BxP, rng, cfg: SamplingConfig, mesh,
             chunks: int, shards: int):
    """Run the B prompts once into a P-slot cache and draw every row's response token 0.

    Returns (prompt cache, first tokens [R], their log-probs [R]). The n draws
    of a prompt come from its one set of logits, one sample index at a time
    (`lax.map`), so the float32 logits and noise are [B, V], not [B*n, V].
    With chunks > 1 the prompts go through in that many sequential chunks
    (`prefill_chunks`, `lax.map`), each spanning every data shard.
    """
    plen = prompt_ids_BxP.shape[1]

    def one(ids_CxP, mask_CxP, prompt_C):
        positions_CxP = jnp.maximum(jnp.cumsum(mask_CxP, axis=-1) - 1, 0)
        cache = model.init_cache(ids_CxP.shape[0], plen, dtype=_DTYPES[cfg.cache_dtype])
        h_CxPxD, cache = model.forward_cached(
            ids_CxP, positions_CxP, cache, write_index=jnp.int32(0), kv_mask_BxS=mask_CxP, weights=weights
        )
        # One-shot, the prefill is the memory peak and the loops' [V, D] copy is not alive yet: read the
        # unembedding as stored. Chunked, that copy is alive throughout: reuse it instead of a second one.
        h_CxD = h_CxPxD[:, -1]
        logits_CxV = _logits(h_CxD, model.unembedding()) if chunks == 1 else _logits_vd(h_CxD, w_VxD)
        logits_CxV = _rows(logits_CxV, mesh)
        rows_C = prompt_C * cfg.n

        def draw(j):  # sample j of every prompt: rows b n + j
            return sample_next_token(logits_CxV, token_keys(rng, rows_C + j, jnp.zeros_like(rows_C)), cfg)

        tokens_nxC, logp_nxC = lax.map(draw, jnp.arange(cfg.n, dtype=jnp.int32))
        return cache, tokens_nxC.T, logp_nxC.T  # [C, n]: row b n + j, rows of one prompt contiguous

    prompt_B = jnp.arange(prompt_ids_BxP.shape[0], dtype=jnp.int32)
    if chunks == 1:
        cache, tokens_Bxn, logp_Bxn = one(prompt_ids_BxP, mask_BxP, prompt_B)
    else:
        split = partial(_chunked, chunks=chunks, shards=shards)
        cache, tokens_Bxn, logp_Bxn = jax.tree.map(
            partial(_unchunked, shards=shards),
            lax.map(lambda a: one(*a), (split(prompt_ids_BxP), split(mask_BxP), split(prompt_B))),
        )
        cache = cache.map(lambda x, names: _constrain(x, mesh, names))
    first = lambda x_Bxn: _rows(x_Bxn.reshape(-1), mesh)  # noqa: E731
    return cache, first(tokens_Bxn), first(logp_Bxn)


def _refill(state: _DecodeState, prompts: _Prompts, cfg: SamplingConfig, mesh) -> _DecodeState:
    """Give each free slot the next row of its data shard's queue.

    Per shard, free slots take queue entries in slot order; the row's prompt
    K/V is copied from the prompt cache into the slot's first P cache slots
    (every slot at once, kept where the slot was not refilled: static shapes),
    and its response token 0 (drawn at prefill) is fed next. Every gather is
    batched over the shard axis, so a shard only reads its own rows.
    """
    shards, per_shard = state.queue.shape
    slots = state.live.shape[0]
    free_DxM = ~state.live.reshape(shards, -1)
    entry_DxM = state.next[:, None] + jnp.cumsum(free_DxM, axis=1, dtype=jnp.int32) - 1
    take_DxM = free_DxM & (entry_DxM < state.count[:, None])
    local_DxM = jax.vmap(lambda q, e: q[e])(state.queue, jnp.minimum(entry_DxM, per_shard - 1))
    prompt_DxM = local_DxM // cfg.n  # shard-local prompt index
    take_S = _rows(take_DxM.reshape(slots), mesh)
    plen = state.prompt_mask.shape[1]

    def copy(x_cache, x_prompt, names):
        axis = names.index("cache_seq")
        old = lax.slice_in_dim(x_cache, 0, plen, axis=axis)
        new = _shard_take(x_prompt, prompt_DxM, mesh, names)
        keep = take_S.reshape((slots,) + (1,) * (x_cache.ndim - 1))
        return _constrain(lax.dynamic_update_slice_in_dim(x_cache, jnp.where(keep, new, old), 0, axis), mesh, names)

    cache = KVCache(
        k=tuple(copy(c, p, K_CACHE_AXES) for c, p in zip(state.cache.k, prompts.cache.k, strict=True)),
        v=tuple(copy(c, p, V_CACHE_AXES) for c, p in zip(state.cache.v, prompts.cache.v, strict=True)),
    )
    pick = lambda new, old: jnp.where(take_S.reshape((slots,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
    row_S = (jnp.arange(shards, dtype=jnp.int32)[:, None] * per_shard + local_DxM).reshape(slots)
    return state.replace(
        row=pick(row_S, state.row),
        pos=pick(jnp.ones_like(state.pos), state.pos),
        live=state.live | take_S,
        last=pick(_shard_take(prompts.first, local_DxM, mesh), state.last),
        prompt_len=pick(_shard_take(prompts.mask.sum(-1), prompt_DxM, mesh), state.prompt_len),
        prompt_mask=pick(_shard_take(prompts.mask, prompt_DxM, mesh), state.prompt_mask),
        cache=cache,
        next=state.next + take_DxM.sum(1, dtype=jnp.int32),
    )


def _decode_segment(
    model: Transformer, weights, w_VxD, state: _DecodeState, end: int | None, refill, cfg: SamplingConfig, mesh,
    shrink_below: int | None = None,
) -> _DecodeState:
    """Feed each slot's last token and draw the next until every row stopped, or until the cache is outgrown.

    One-shot (refill None: slot r holds row r throughout): until step `end`
    (None: no bound). Continuous batching (`refill` refills free slots, run
    in the steps where a slot is free and a row waits): while every live
    slot's `pos` is below `end`, and, with `shrink_below`, not below it
    (`_decode_waves`). weights: the model's `decode_weights()`, built once
    outside the loops.
    """
    continuous = refill is not None
    plen = state.prompt_mask.shape[1]
    slots, cache_slots = state.row.shape[0], state.cache.slots

    def cond(s: _DecodeState):
        if not continuous:
            return jnp.any(s.live) if end is None else (s.step < end) & jnp.any(s.live)
        # A slot at `pos` writes cache slot P + pos - 1: the segment holds it while pos < end. With
        # `shrink_below`, the segment also ends once every live row would fit the first segment again.
        furthest = _furthest(s)
        go = _active(s) & (furthest < end)
        return go if shrink_below is None else go & (furthest >= shrink_below)

    def body(s: _DecodeState):
        at = s.pos if continuous else s.step  # one-shot: every live row is at the loop's step (a scalar write)
        kv_mask = jnp.concatenate([s.prompt_mask, jnp.ones((slots, cache_slots - plen), jnp.int32)], axis=1)
        h_Sx1xD, cache = model.forward_cached(
            s.last[:, None], (s.prompt_len + at - 1)[:, None], s.cache, write_index=plen + at - 1,
            kv_mask_BxS=kv_mask, weights=weights,
        )  # fmt: skip
        logits_SxV = _logits_vd(h_Sx1xD[:, 0], w_VxD)
        tokens_S, logp_S = sample_next_token(logits_SxV, token_keys(s.rng, s.row, s.pos), cfg)
        s = _record(s.replace(cache=cache), tokens_S, logp_S, cfg, mesh, continuous)
        if continuous:
            s = lax.cond(jnp.any(~s.live) & _waiting(s), refill, lambda x: x, s)
        return s

    return lax.while_loop(cond, body, state)


def _waiting(s: _DecodeState):
    """Some shard has rows no slot has taken yet."""
    return jnp.any(s.next < s.count)


def _active(s: _DecodeState):
    """Continuous batching: a row is decoding or waiting for a slot."""
    return jnp.any(s.live) | _waiting(s)


def _furthest(s: _DecodeState):
    """The largest `pos` of a live slot (0 when none is live)."""
    return jnp.max(jnp.where(s.live, s.pos, 0))


def _decode_waves(model: Transformer, weights, w_VxD, state: _DecodeState, segments, refill, cfg: SamplingConfig,
                  mesh) -> _DecodeState:
    """Continuous batching's decode: the segments, re-run whenever the live rows fit the shortest cache again.

    A segment's cache must hold the furthest live row, so a segment ends when
    a row's next write would not fit (`pos` reaches its end). Refilled rows
    start at the front, so once every live row is short again (all below half
    the first segment: uniform lengths make this happen every wave) the
    current segment ends, the cache is cut back to the first segment's length
    (one copy) and the segments run again (`lax.while_loop` over these
    passes): every wave reads the short caches a one-shot call reads, instead
    of the full-length one. Half, not all, of the first segment, so each pass
    runs at least that many steps for its copies. The segments still in the
    pass when one ends early run no step (their conditions are false); their
    cache copies are the cost.
    """
    if len(segments) == 1:
        return _decode_segment(model, weights, w_VxD, state, segments[0][0], refill, cfg, mesh)
    first_end, first_slots = segments[0]
    shrink_below = (first_end + 1) // 2

    def one_pass(s: _DecodeState) -> _DecodeState:
        for k, (end, cache_slots) in enumerate(segments):
            if k:
                s = s.replace(cache=_grow_cache(s.cache, cache_slots, mesh))
            s = _decode_segment(model, weights, w_VxD, s, end, refill, cfg, mesh, shrink_below=shrink_below if k else None)
        return s.replace(cache=_shrink_cache(s.cache, first_slots, mesh))

    return lax.while_loop(_active, one_pass, state)


def _shrink_cache(cache, slots: int, mesh):
    """The cache's first `slots` slots (one copy): what every live row's context fits in."""
    return cache.map(lambda x, names: _constrain(lax.slice_in_dim(x, 0, slots, axis=names.index("cache_seq")), mesh,
                                                 names))


def _grow_cache(cache, slots: int, mesh):
    """Zero-pad the cache's slot axis to `slots` (one copy per decode segment)."""

    def grow(x, names):
        pad = [(0, 0)] * x.ndim
        axis = names.index("cache_seq")
        pad[axis] = (0, slots - x.shape[axis])
        return _constrain(jnp.pad(x, pad), mesh, names)

    return cache.map(grow)


def slot_layout(cfg: SamplingConfig, batch: int, mesh: Mesh | None) -> tuple[int, int]:
    """(slots S, data shards D) of a call on `batch` prompts; ValueError if they do not fit the mesh.

    S = R = batch * n (one-shot, D = 1: the rows follow the batch sharding
    like every per-row array) unless 0 < cfg.slots < R. Then D =
    mesh.data * mesh.fsdp, and each shard owns batch/D prompts and S/D slots:
    both must divide.
    """
    rows = batch * cfg.n
    if not 0 < cfg.slots < rows:
        return rows, 1
    shards = data_shards(mesh)
    if cfg.slots % shards or batch % shards:
        raise ValueError(
            f"slots={cfg.slots} and {batch} prompts must both split over the {shards} data shards "
            "(mesh data * fsdp): each shard refills its own slots from its own prompts"
        )
    return cfg.slots, shards


def _canonical(cfg: SamplingConfig, batch: int, mesh) -> SamplingConfig:
    """cfg checked against the mesh (`slot_layout`), with slots = 0 when every row gets one anyway, so
    settings that run the same program share its compilation."""
    slots, _ = slot_layout(cfg, batch, mesh)
    return cfg if slots < batch * cfg.n else dataclasses.replace(cfg, slots=0)


@partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _sample(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng, *, cfg: SamplingConfig, mesh) -> Rollout:
    """Prefill, then the decode segments, in one jitted function.

    The KV caches are created inside, so XLA updates them in place in the
    loops (nothing to donate); only the Rollout leaves the function.
    """
    model = nnx.merge(graphdef, params)
    batch, plen = prompt_ids_BxP.shape
    rows, max_new = batch * cfg.n, cfg.max_new_tokens
    slots, shards = slot_layout(cfg, batch, mesh)
    continuous = slots < rows
    segments = decode_segments(plen, max_new, min_steps=cfg.segment_steps)
    # Loop-invariant, built once outside the loops: the layers' decode weights (the sampler's copy, in the
    # compute dtype) and the unembedding as [V, D] (a tied embedding already is: the transposes cancel).
    weights = model.decode_weights()
    w_VxD = _constrain(model.unembedding().T, mesh, DECODE_AXES["unembed"])
    mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    chunks = prefill_chunks(cfg, batch, slots, shards)
    prompt_cache, first_R, first_logp_R = _prefill(model, weights, w_VxD, prompt_ids_BxP, mask_BxP, rng, cfg, mesh,
                                                   chunks, shards)

    # Response token 0 of every row is drawn; rows it stopped never take a slot.
    pad = lambda x, fill: _rows(jnp.pad(x[:, None], ((0, 0), (0, max_new - 1)), constant_values=fill), mesh)  # noqa: E731
    decoding_R = ~_is_stop(first_R, cfg) & (max_new > 1)
    dtype = _DTYPES[cfg.cache_dtype]
    if continuous:
        decoding_DxQ = _shard_view(decoding_R, shards, mesh)
        empty = lambda shape, dt=jnp.int32: _rows(jnp.zeros(shape, dt), mesh)  # noqa: E731
        state = _DecodeState(
            step=jnp.int32(1), tokens=pad(first_R, cfg.pad_id), logprobs=pad(first_logp_R, 0.0),
            row=empty(slots), pos=empty(slots), live=empty(slots, bool), last=empty(slots),
            prompt_len=empty(slots), prompt_mask=empty((slots, plen)),
            cache=model.init_cache(slots, segments[0][1], dtype=dtype).map(lambda x, names: _constrain(x, mesh, names)),
            queue=jnp.argsort(~decoding_DxQ, axis=1, stable=True).astype(jnp.int32),  # decoding rows first, in order
            next=jnp.zeros((shards,), jnp.int32), count=decoding_DxQ.sum(1, dtype=jnp.int32), rng=rng,
        )  # fmt: skip
        prompts = _Prompts(cache=prompt_cache, mask=mask_BxP, first=first_R)
        refill = partial(_refill, prompts=prompts, cfg=cfg, mesh=mesh)
        state = refill(state)
    else:
        rep = lambda x: _rows(jnp.repeat(x, cfg.n, axis=0), mesh)  # noqa: E731  [B, ...] -> [B*n, ...]
        state = _DecodeState(
            step=jnp.int32(1), tokens=pad(first_R, cfg.pad_id), logprobs=pad(first_logp_R, 0.0),
            row=_rows(jnp.arange(rows, dtype=jnp.int32), mesh), pos=_rows(jnp.ones((rows,), jnp.int32), mesh),
            live=decoding_R, last=first_R, prompt_len=rep(mask_BxP.sum(-1)), prompt_mask=rep(mask_BxP),
            cache=_grow_cache(prompt_cache.map(lambda x, names: rep(x)), segments[0][1], mesh),
            queue=jnp.zeros((1, 0), jnp.int32), next=jnp.zeros((1,), jnp.int32), count=jnp.zeros((1,), jnp.int32),
            rng=rng,
        )  # fmt: skip
        refill = None
    if continuous:
        state = _decode_waves(model, weights, w_VxD, state, segments, refill, cfg, mesh)
    else:
        for end, cache_slots in segments:
            if cache_slots > state.cache.slots:
                state = state.replace(cache=_grow_cache(state.cache, cache_slots, mesh))
            state = _decode_segment(model, weights, w_VxD, state, end, refill, cfg, mesh)
    # A row's length is up to its first stop token (PAD follows it), else the whole buffer.
    stop_RxL = _is_stop(state.tokens, cfg)
    stopped_R = jnp.any(stop_RxL, axis=1)
    lengths_R = jnp.where(stopped_R, jnp.argmax(stop_RxL, axis=1) + 1, max_new).astype(jnp.int32)
    return Rollout(
        tokens=state.tokens,
        mask=(jnp.arange(max_new, dtype=jnp.int32)[None, :] < lengths_R[:, None]).astype(jnp.int32),
        logprobs=state.logprobs,
        lengths=lengths_R,
        finish_code=jnp.where(stopped_R, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
        prompt_index=jnp.arange(rows, dtype=jnp.int32) // cfg.n,
        prompt_ids=_rows(jnp.repeat(prompt_ids_BxP, cfg.n, axis=0), mesh),
        prompt_mask=_rows(jnp.repeat(prompt_mask_BxP, cfg.n, axis=0), mesh),
    )


# ----------------------------------------------------------------------------
# Host side: prompt packing and the public API
# ----------------------------------------------------------------------------
def choose_bucket(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= length; ValueError if the prompt is longer than the largest."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket ({max(buckets)})")


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, pad_id: int, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token-id lists to one bucket length: (ids_BxP int32, mask_BxP int32).

    ValueError on an empty batch, an empty prompt, a non-integer id or a prompt
    longer than the largest bucket.
    """
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets={buckets}: must be a non-empty strictly ascending tuple of positive lengths")
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids (shape {arr.shape})")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt {i} holds non-integer token ids (dtype {arr.dtype})")
        rows.append(arr.astype(np.int64))
    plen = choose_bucket(max(len(r) for r in rows), buckets)
    ids = np.full((len(rows), plen), pad_id, np.int32)
    mask = np.zeros((len(rows), plen), np.int32)
    for i, r in enumerate(rows):
        ids[i, plen - len(r):] = r
        mask[i, plen - len(r):] = 1
    return ids, mask


def _split_model(model) -> tuple[Any, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2:
        return model
    raise ValueError(f"model must be an nnx.Module or a (graphdef, state) pair, got {type(model).__name__}")


class Sampler:
    """The jitted sampler for fixed settings; the trainer's lower-level entry point.

    Holds only static things (config, mesh); the jitted functions are module
    level, so two Samplers with equal settings share compilations.
    """

    def __init__(self, config: SamplingConfig, *, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh

    def sample(self, model, prompt_ids_BxP, prompt_mask_BxP, rng) -> Rollout:
        """Sample `config.n` responses for each left-padded prompt row.

        Args:
          model: an `nnx.Module` (split here) or a `(graphdef, params)` pair.
          prompt_ids_BxP: int token ids, left-padded (the last column is each
            prompt's last token).
          prompt_mask_BxP: 1 on real tokens, 0 on the left padding.
          rng: a JAX PRNG key (typed, `jax.random.key`); same key, same
            inputs -> same samples, whatever `config.slots`.

        With a mesh, rows split over ("data", "fsdp") when B * n divides by
        their size (else they are replicated); pass prompt arrays already
        placed on the mesh to avoid a transfer. With `config.slots` (continuous
        batching) B and the slots must split over those data shards
        (`slot_layout`; a ValueError before anything compiles).
        """
        cfg = self.config
        if isinstance(model, Transformer):
            cfg.check_vocab(model.cfg.vocab_size)
        graphdef, params = _split_model(model)
        ids = jnp.asarray(prompt_ids_BxP, jnp.int32)
        mask = jnp.asarray(prompt_mask_BxP, jnp.int32)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must have the same non-empty [B, P] shape")
        cfg = _canonical(cfg, ids.shape[0], self.mesh)
        # Under the mesh the model's own activation constraints apply too.
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return _sample(graphdef, params, ids, mask, rng, cfg=cfg, mesh=self.mesh)

    def lower(self, graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng=None) -> jax.stages.Lowered:
        """The program `sample` runs, lowered for (possibly abstract) inputs: nothing is allocated or run.

        params, prompt_ids_BxP, prompt_mask_BxP: arrays or `jax.ShapeDtypeStruct`s
        (int32 [B, P] prompts; give them the shardings `sample` would see,
        e.g. `entrl.sharding.batch_sharding`); rng defaults to `jax.random.key(0)` (`entrl plan`).
        `.compile().memory_analysis()` of the result is the memory the call
        needs (KV caches included: `kv_cache_bytes`). ValueError as `sample`.
        """
        cfg = _canonical(self.config, prompt_ids_BxP.shape[0], self.mesh)
        rng = jax.random.key(0) if rng is None else rng
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return _sample.lower(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng, cfg=cfg, mesh=self.mesh)

    def kv_cache_bytes(self, model_cfg, batch: int, prompt_len: int) -> dict[str, int]:
        """Bytes of the KV caches of one call on `batch` prompts of bucket `prompt_len`.

        "slots": the decoding cache, S rows x (P + L - 1) slots at its longest
        (S = `config.slots`, or every row); "prompts": the prompts' own cache,
        B x P, kept for refills under continuous batching (the one-shot sampler
        repeats it into the slots and drops it); "total" the two when both live.
        """
        slots, _ = slot_layout(self.config, batch, None)
        per_slot = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim
        per_slot *= jnp.dtype(_DTYPES[self.config.cache_dtype]).itemsize
        length = decode_segments(prompt_len, self.config.max_new_tokens, min_steps=self.config.segment_steps)[-1][1]
        out = dict(slots=slots * length * per_slot, prompts=batch * prompt_len * per_slot)
        out["total"] = out["slots"] + (out["prompts"] if slots < batch * self.config.n else 0)
        return out


def _as_id_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (int, np.integer)):
        return (int(ids),)
    return tuple(int(i) for i in ids)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int,
    eos_ids: Sequence[int] | int | None = None,
    seed: int = 0,
    pad_id: int | None = None,
    buckets: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    cache_dtype: str = "float32",
    slots: int = 0,
) -> Rollout:
    """Sample n responses for each prompt (a list of token-id lists).

    `slots`: at most this many (prompt, sample) rows decode at once, each slot
    refilled with the next row when its row stops (0 = every row at once);
    the same responses for the same seed either way.

    `eos_ids` defaults to the model config's `eos_token_id`, `pad_id` to its
    `pad_token_id` (else the first EOS id, else 0). PAD and BOS are banned from
    the responses unless they are EOS ids. Returns a `Rollout` with
    [len(prompts) * n, max_new_tokens] arrays.

    Raises:
      ValueError: an empty prompt list or prompt, a prompt longer than the
        largest bucket, token ids outside the vocabulary, n < 1, top_p outside
        (0, 1], top_k < 0, a negative temperature, max_new_tokens < 1, slots
        that (or prompts that) do not split over the mesh's data shards.
    """
    mcfg = model.cfg if isinstance(model, Transformer) else None
    if eos_ids is None and mcfg is not None:
        eos_ids = mcfg.eos_token_ids
    eos = _as_id_tuple(eos_ids)
    if pad_id is None:
        pad_id = mcfg.pad_token_id if mcfg is not None else None
        if pad_id is None:
            pad_id = eos[0] if eos else 0
    cfg = SamplingConfig(
        n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        cache_dtype=cache_dtype, slots=slots, **special_token_ids(eos, pad_id, mcfg.bos_token_id if mcfg is not None else None),
    )  # fmt: skip
    ids, mask = pad_prompts(prompts, pad_id=cfg.pad_id, buckets=DEFAULT_BUCKETS if buckets is None else buckets)
    if mcfg is not None:
        vocab = mcfg.vocab_size
        cfg.check_vocab(vocab)  # before any compilation
        bad = (ids >= vocab) | (ids < 0)
        if np.any(bad & (mask == 1)):
            raise ValueError(f"prompt token ids must lie in [0, {vocab}) (the vocabulary)")
    slot_layout(cfg, ids.shape[0], mesh)
    if mesh is not None:
        ids, mask = (jax.device_put(x, NamedSharding(mesh, P())) for x in (ids, mask))
    return Sampler(cfg, mesh=mesh).sample(model, ids, mask, jax.random.key(seed))
