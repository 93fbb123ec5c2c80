"""Per-token log-probs and entropies from final hidden states, chunked over tokens.

Every RL loss in entrl needs two numbers per response token t, both at the
sampling temperature T:

    z_t   = (h_t @ W) / T                       next-token logits, shape [V]
    logp_t = z_t[y_t] - logsumexp(z_t)          log-prob of the given token y_t
    H_t   = -sum_v p_tv log p_tv,  p_t = softmax(z_t)   entropy of the distribution

With V = 151,936 (Qwen) and a few thousand tokens per sequence the float32
logits of a batch are gigabytes, while the two outputs are a few bytes per
token. Design decisions:

* Chunk over tokens, never over the vocabulary. Each chunk of C tokens builds
  its [C, V] logits, reduces them to (logp, H, logsumexp) and drops them, so
  the peak extra memory is O(C * V) instead of O(B * T * V). A full vocabulary
  row per token keeps the softmax exact (no online rescaling needed).
* The backward pass is a `jax.custom_vjp` that recomputes each chunk's logits
  from the saved hidden states (residuals are O(B * T) scalars plus the
  inputs), so autodiff never stores [B, T, V] either. See
  `_chunked_stats_bwd` for the derivative.
* Chunks are *strided*: flat token i goes to chunk i % N, slot i // N. The
  per-token statistics are independent, so any assignment is correct; the
  strided one maps a leading-axis (batch) sharding onto the within-chunk axis,
  so every device works on its share of each chunk and the scan axis stays
  unsharded (a contiguous split would shard the scan axis instead).
* Matmuls run in the inputs' dtype (bfloat16 allowed) with float32
  accumulation; all softmax statistics are float32.
* Default chunk_size = 512 tokens: the largest chunk whose peak extra memory
  stays under a quarter of the naive full-logits version's in both passes at a
  1.5B model's sizes (benchmarks/bench_token_stats.py measures it). On
  accelerators, bigger chunks feed the matrix units better; the global chunk
  is split across data-parallel shards.
* The backward accumulates dW in a float32 [D, V] carry (one extra copy of w;
  XLA on CPU also keeps a partial product per step), small next to [B*T, V]
  whenever B*T > D.
* Left out on purpose: vocabulary chunking (needed only if one [C, V] row block
  does not fit, which a smaller C solves) and fused Pallas kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

__all__ = ["batched_response_stats", "compute_logprobs", "micro_rows", "naive_token_stats", "response_stats",
           "token_logprobs", "token_logprobs_and_entropy"]

_F32 = jnp.float32


# ----------------------------------------------------------------------------
# Validation (host side, only on concrete values)
# ----------------------------------------------------------------------------
def _concrete(x) -> np.ndarray | None:
    """`x` as a numpy array if it is concrete, None if it is a tracer (inside jit/grad)
    or a multi-process array this process cannot read whole."""
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validate(h_BxTxD, w_DxV, targets_BxT, temperature, chunk_size: int) -> None:
    if h_BxTxD.ndim != 3:
        raise ValueError(f"h must have shape [B, T, D], got {h_BxTxD.shape}")
    if w_DxV.ndim != 2:
        raise ValueError(f"w must have shape [D, V], got {w_DxV.shape}")
    if h_BxTxD.shape[-1] != w_DxV.shape[0]:
        raise ValueError(f"hidden size mismatch: h has D={h_BxTxD.shape[-1]}, w has D={w_DxV.shape[0]}")
    if tuple(targets_BxT.shape) != tuple(h_BxTxD.shape[:2]):
        raise ValueError(f"targets must have shape {tuple(h_BxTxD.shape[:2])} (h's [B, T]), got {targets_BxT.shape}")
    if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets_BxT.dtype}")
    for name, x in (("h", h_BxTxD), ("w", w_DxV)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    t = _concrete(temperature)
    if t is not None:
        if t.ndim != 0:
            raise ValueError(f"temperature must be a scalar, got shape {t.shape}")
        if not np.isfinite(t) or float(t) <= 0.0:
            raise ValueError(f"temperature must be a finite number > 0, got {float(t)}")
    y = _concrete(targets_BxT)
    if y is not None and y.size:
        lo, hi, vocab = int(y.min()), int(y.max()), w_DxV.shape[1]
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets must lie in [0, {vocab}) (vocabulary size), got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------
# Per-chunk math
# ----------------------------------------------------------------------------
def _logits(h_CxD, w_DxV, temperature):
    """z = (h @ w) / T in float32; the matmul runs in h/w's dtype with f32 accumulation."""
    l_CxV = lax.dot_general(h_CxD, w_DxV, (((1,), (0,)), ((), ())), preferred_element_type=_F32)
    return l_CxV / temperature


def _stats_from_logits(z_CxV, y_C):
    """(logp of y, entropy, logsumexp) per row of float32 logits z.

    logp_y = z_y - lse(z),   H = -sum_v p_v (z_v - lse(z)),   p = exp(z - lse(z)).
    A target outside [0, V) (only possible under jit, where it cannot be checked)
    gives logp = NaN rather than a silently wrong number.
    """
    lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
    logp_all_CxV = z_CxV - lse_C[:, None]
    ent_C = -jnp.sum(jnp.exp(logp_all_CxV) * logp_all_CxV, axis=-1)
    # Gather from z itself (not from logp_all) so XLA keeps one [C, V] buffer, not two.
    z_y_C = jnp.take_along_axis(z_CxV, y_C[:, None], axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]
    return z_y_C - lse_C, ent_C, lse_C


# ----------------------------------------------------------------------------
# Chunked core with a memory-light custom VJP
# ----------------------------------------------------------------------------
@jax.custom_vjp
def _chunked_stats(h_NxCxD, w_DxV, y_NxC, temperature):
    logp_NxC, ent_NxC, _ = _chunked_stats_fwd_scan(h_NxCxD, w_DxV, y_NxC, temperature)
    return logp_NxC, ent_NxC


def _chunked_stats_fwd_scan(h_NxCxD, w_DxV, y_NxC, temperature):
    def one_chunk(args):
        h_CxD, y_C = args
        return _stats_from_logits(_logits(h_CxD, w_DxV, temperature), y_C)

    return lax.map(one_chunk, (h_NxCxD, y_NxC))


def _chunked_stats_fwd(h_NxCxD, w_DxV, y_NxC, temperature):
    logp_NxC, ent_NxC, lse_NxC = _chunked_stats_fwd_scan(h_NxCxD, w_DxV, y_NxC, temperature)
    return (logp_NxC, ent_NxC), (h_NxCxD, w_DxV, y_NxC, temperature, lse_NxC, ent_NxC)


def _chunked_stats_bwd(res, cotangents):
    r"""Backward pass, recomputing each chunk's logits.

    With z = l / T, l = h @ W, p = softmax(z), log p = z - lse(z), and upstream
    cotangents a_t (for logp_t) and b_t (for H_t):

        d logp_t / d z_tv = 1[v = y_t] - p_tv
        d H_t    / d z_tv = -p_tv (log p_tv + H_t)

    (from H = lse(z) - sum_v p_v z_v: dH/dz_v = p_v - p_v - p_v z_v + p_v sum_u p_u z_u
    = -p_v (z_v - E_p[z]) = -p_v (log p_v + H), since E_p[z] = lse - H). Then

        g_z = a (onehot - p) - b p (log p + H),      g_l = g_z / T,
        dh  = g_l @ W^T,   dW = sum_chunks h^T @ g_l,
        dT  = sum_tv g_z * dz/dT = -(1/T) sum_tv g_z * z.

    Only one chunk's [C, V] block exists at a time; dW is accumulated in float32.
    """
    h_NxCxD, w_DxV, y_NxC, temperature, lse_NxC, ent_NxC = res
    g_logp_NxC, g_ent_NxC = cotangents
    vocab = w_DxV.shape[1]
    compute_dtype = h_NxCxD.dtype

    def step(carry, xs):
        g_w_DxV, g_temp = carry
        h_CxD, y_C, lse_C, ent_C, a_C, b_C = xs
        z_CxV = _logits(h_CxD, w_DxV, temperature)
        logp_all_CxV = z_CxV - lse_C[:, None]
        p_CxV = jnp.exp(logp_all_CxV)
        onehot_CxV = (lax.broadcasted_iota(jnp.int32, z_CxV.shape, 1) == y_C[:, None].astype(jnp.int32)).astype(_F32)
        g_z_CxV = a_C[:, None] * (onehot_CxV - p_CxV) - b_C[:, None] * p_CxV * (logp_all_CxV + ent_C[:, None])
        g_temp = g_temp - jnp.sum(g_z_CxV * z_CxV) / temperature
        g_l_CxV = (g_z_CxV / temperature).astype(compute_dtype)
        g_h_CxD = lax.dot_general(g_l_CxV, w_DxV, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        g_w_DxV = g_w_DxV + lax.dot_general(h_CxD, g_l_CxV, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
        return (g_w_DxV, g_temp), g_h_CxD.astype(h_NxCxD.dtype)

    init = (jnp.zeros((w_DxV.shape[0], vocab), _F32), jnp.zeros((), _F32))
    xs = (h_NxCxD, y_NxC, lse_NxC, ent_NxC, g_logp_NxC.astype(_F32), g_ent_NxC.astype(_F32))
    (g_w_DxV, g_temp), g_h_NxCxD = lax.scan(step, init, xs)
    return g_h_NxCxD, g_w_DxV.astype(w_DxV.dtype), None, g_temp.astype(temperature.dtype)


_chunked_stats.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def token_logprobs_and_entropy(h_BxTxD, w_DxV, targets_BxT, *, temperature=1.0, chunk_size: int = 512):
    """Log-prob of `targets` and entropy of the next-token distribution, per token.

    With z_bt = (h_bt @ w) / T (matmul in h/w's dtype, float32 accumulation):

        logp_bt = z_bt[targets_bt] - logsumexp(z_bt)
        H_bt    = -sum_v softmax(z_bt)_v * log softmax(z_bt)_v

    computed over `chunk_size` tokens at a time (B*T tokens flattened and padded),
    so neither the forward nor the backward pass holds more than one
    [chunk_size, V] float32 block. Both outputs are differentiable w.r.t. h, w
    and temperature; callers `stop_gradient` the entropy where it must not carry
    gradient (e.g. SENT's ranking). Pure and jit-compatible.

    Args:
      h_BxTxD: final hidden states (after the final norm), float32 or bfloat16.
      w_DxV: unembedding (lm_head transposed, or the tied embedding transposed).
      targets_BxT: integer token ids in [0, V) whose log-prob is wanted.
      temperature: T > 0 (the sampling temperature), Python or JAX scalar.
      chunk_size: tokens per chunk (the global chunk; each data-parallel shard
        gets its share). Lower it to cut peak memory, at some speed cost.

    Returns:
      (logp_BxT, entropy_BxT), both float32.

    Raises:
      ValueError: wrong ranks/shapes/dtypes, chunk_size < 1, temperature <= 0, or
        (when targets are concrete) targets outside [0, V).
    """
    _validate(h_BxTxD, w_DxV, targets_BxT, temperature, chunk_size)
    return _token_stats_jit(h_BxTxD, w_DxV, targets_BxT, jnp.asarray(temperature, _F32), int(chunk_size))


# Jitted so an eager call compiles once instead of dispatching a dozen small ops.
@functools.partial(jax.jit, static_argnums=4)
def _token_stats_jit(h_BxTxD, w_DxV, targets_BxT, temperature, chunk_size: int):
    batch, seq, dim = h_BxTxD.shape
    n_tok = batch * seq
    if n_tok == 0:
        empty = jnp.zeros((batch, seq), _F32)
        return empty, empty
    compute_dtype = jnp.promote_types(h_BxTxD.dtype, w_DxV.dtype)
    h_PxD = h_BxTxD.reshape(n_tok, dim).astype(compute_dtype)
    w_DxV = w_DxV.astype(compute_dtype)
    y_P = targets_BxT.reshape(n_tok).astype(jnp.int32)

    chunk = min(chunk_size, n_tok)  # never pad a small batch up to one big chunk
    n_chunks = math.ceil(n_tok / chunk)
    pad = n_chunks * chunk - n_tok
    h_PxD = jnp.pad(h_PxD, ((0, pad), (0, 0)))
    y_P = jnp.pad(y_P, (0, pad))
    # Strided chunking (see module docstring): token i -> chunk i % N, slot i // N.
    h_NxCxD = h_PxD.reshape(chunk, n_chunks, dim).transpose(1, 0, 2)
    y_NxC = y_P.reshape(chunk, n_chunks).T

    logp_NxC, ent_NxC = _chunked_stats(h_NxCxD, w_DxV, y_NxC, temperature)
    logp_BxT = logp_NxC.T.reshape(-1)[:n_tok].reshape(batch, seq)
    ent_BxT = ent_NxC.T.reshape(-1)[:n_tok].reshape(batch, seq)
    return logp_BxT, ent_BxT


def token_logprobs(h_BxTxD, w_DxV, targets_BxT, *, temperature=1.0, chunk_size: int = 512):
    """Only the log-probs of `token_logprobs_and_entropy` (same math, same cost)."""
    return token_logprobs_and_entropy(h_BxTxD, w_DxV, targets_BxT, temperature=temperature, chunk_size=chunk_size)[0]


def naive_token_stats(h_BxTxD, w_DxV, targets_BxT, temperature=1.0):
    """Reference: the same (logp_BxT, entropy_BxT) from full [B, T, V] float32 logits.

    Plain autodiff applies; memory is O(B * T * V). For tests and benchmarks only.
    """
    _validate(h_BxTxD, w_DxV, targets_BxT, temperature, 1)
    return _naive_jit(h_BxTxD, w_DxV, targets_BxT, jnp.asarray(temperature, _F32))


@jax.jit
def _naive_jit(h_BxTxD, w_DxV, targets_BxT, temperature):
    compute_dtype = jnp.promote_types(h_BxTxD.dtype, w_DxV.dtype)
    z_BxTxV = jnp.einsum(
        "btd,dv->btv", h_BxTxD.astype(compute_dtype), w_DxV.astype(compute_dtype), preferred_element_type=_F32
    ) / temperature
    logp_all_BxTxV = jax.nn.log_softmax(z_BxTxV, axis=-1)
    logp_BxT = jnp.take_along_axis(logp_all_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ent_BxT = -jnp.sum(jnp.exp(logp_all_BxTxV) * logp_all_BxTxV, axis=-1)
    return logp_BxT, ent_BxT


# ---------------------------------------------------------------------------
# Response rows: prompt (left-padded, P) ++ response (L) -> per-token stats of the response.
# Used by the RL update (`entrl.rl.step`), the evaluation's entropy and the SFT warm start.
# ---------------------------------------------------------------------------


def response_stats(model, prompt_ids_NxP, prompt_mask_NxP, resp_ids_NxL, *, temperature: float, chunk_size: int = 512):
    """Per-token log-prob and entropy of the response tokens under `model`.

    Returns `(logp_NxL, entropy_NxL)` in float32 at `temperature`. Positions are
    `cumsum(mask) - 1` over the left-padded prompt, continuing through the
    response, exactly as the sampler assigns them.
    """
    P = prompt_ids_NxP.shape[1]
    seq_NxS = jnp.concatenate([prompt_ids_NxP, resp_ids_NxL], axis=1)
    mask_NxS = jnp.concatenate([prompt_mask_NxP.astype(jnp.int32), jnp.ones_like(resp_ids_NxL, jnp.int32)], axis=1)
    pos_NxS = jnp.maximum(jnp.cumsum(mask_NxS, axis=1) - 1, 0)
    h_NxSxD = model.hidden(seq_NxS[:, :-1], attention_mask=mask_NxS[:, :-1], positions=pos_NxS[:, :-1])
    h_NxLxD = h_NxSxD[:, P - 1:]
    return token_logprobs_and_entropy(h_NxLxD, model.unembedding(), resp_ids_NxL, temperature=temperature, chunk_size=chunk_size)


def micro_rows(x, num_micro: int, shards: int = 1):
    """[N, ...] -> [num_micro, N / num_micro, ...], micro-batch i = the i-th block of every shard's rows.

    Shard s holds rows [s N/S, (s+1) N/S); micro-batch i takes rows s N/S + i p + [0, p) of each
    shard (p = N / (S num_micro)), in shard order, so it stays split over the shards as the batch is.
    """
    n = x.shape[0]
    if n % (shards * num_micro):
        raise ValueError(f"{n} rows do not split into {shards} shards x {num_micro} micro-batches")
    x = x.reshape((shards, num_micro, n // (shards * num_micro)) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num_micro, n // num_micro) + x.shape[3:])


def from_micro_rows(x, shards: int = 1):
    """Inverse of `micro_rows`: [num_micro, N / num_micro, ...] -> [N, ...] in the original row order."""
    num_micro, m = x.shape[:2]
    x = x.reshape((num_micro, shards, m // shards) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((num_micro * m,) + x.shape[3:])


def response_buckets(max_len: int, count: int) -> tuple[int, ...]:
    """The response lengths micro-batches are trimmed to: ceil(L k / K) for k = 1..K, distinct, ending at L."""
    return tuple(sorted({-(-max_len * k // count) for k in range(1, max(count, 1) + 1)}))


def bucket_index(resp_len_M, buckets: tuple[int, ...]):
    """Index of the smallest bucket that holds the longest of the rows' responses ([] int32)."""
    longest = jnp.max(resp_len_M)
    return jnp.sum(longest > jnp.asarray(buckets[:-1], jnp.int32)).astype(jnp.int32)


def resp_lengths(batch: dict):
    """[N] response lengths: `resp_len` if the batch has it, else the extent of `resp_mask`, else L for every row."""
    if "resp_len" in batch:
        return jnp.asarray(batch["resp_len"], jnp.int32)
    n, max_len = batch["resp_ids"].shape
    if "resp_mask" in batch:
        cols = jnp.arange(1, max_len + 1, dtype=jnp.int32)
        return jnp.max(jnp.where(jnp.asarray(batch["resp_mask"]) > 0, cols, 0), axis=1)
    return jnp.full((n,), max_len, jnp.int32)


def trimmed_response_stats(model, mb: dict, length: int, *, temperature: float, chunk_size: int):
    """`response_stats` on the first `length` response columns, zero-padded back to L."""
    max_len = mb["resp_ids"].shape[1]
    logp, ent = response_stats(model, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"][:, :length],
                               temperature=temperature, chunk_size=chunk_size)
    pad = ((0, 0), (0, max_len - length))
    return jnp.pad(logp, pad), jnp.pad(ent, pad)


def batched_response_stats(graphdef, params, batch: dict, *, temperature: float, num_micro: int, chunk_size: int,
                           shards: int = 1, length_buckets: int = 1):
    """Detached log-probs/entropies of a whole batch, one micro-batch at a time (lax.map), each run up to its
    length bucket (`resp_len` of the batch, see `resp_lengths`)."""
    model = nnx.merge(graphdef, params)
    buckets = response_buckets(batch["resp_ids"].shape[1], length_buckets)

    def one(mb):
        branches = [lambda m, b=b: trimmed_response_stats(model, m, b, temperature=temperature, chunk_size=chunk_size)
                    for b in buckets]
        if len(branches) == 1:
            return branches[0](mb)
        return jax.lax.switch(bucket_index(mb["resp_len"], buckets), branches, mb)

    full = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "resp_ids")} | {"resp_len": resp_lengths(batch)}
    logp, ent = jax.lax.map(one, {k: micro_rows(v, num_micro, shards) for k, v in full.items()})
    return (jax.lax.stop_gradient(from_micro_rows(logp, shards)),
            jax.lax.stop_gradient(from_micro_rows(ent, shards)))


compute_logprobs = jax.jit(batched_response_stats, static_argnames=("graphdef", "temperature", "num_micro",
                                                                   "chunk_size", "shards", "length_buckets"))
