"""The pure, jitted RL update: (params, optimizer state, mini-batch) -> (params, optimizer state, metrics).

The row statistics it differentiates (`response_stats`, the micro-batch layout `micro_rows`, the
length buckets) are `entrl.token_stats`'s, shared with the log-prob phase (`compute_logprobs`), the
evaluation and the SFT warm start, none of which needs this module.

Design decisions:
- The model crosses the jit boundary as `(graphdef, params)` (NNX split); it is
  merged inside. `graphdef` and `StepSettings` are static, so nothing recompiles
  between RL steps of the same shapes.
- A rollout row is `prompt (left-padded, P) ++ response (L)`. One forward over
  `P + L - 1` tokens gives the hidden states that predict the L response tokens;
  per-token log-prob and entropy come from `token_stats` in chunks, so the
  `[N, L, V]` logits never exist in float32.
- Micro-batches are per data shard (like verl's `ppo_micro_batch_size_per_gpu`):
  the mini-batch's N rows are split over S data shards (mesh.data * mesh.fsdp)
  as N/S contiguous rows each, and micro-batch i is the i-th block of p rows of
  EVERY shard (`micro_rows`), so a micro-batch never moves rows between
  devices and each device always works on p rows.
- Gradient accumulation over micro-batches with a *global* selection scope
  (SENT's default: quantiles and covariances over the whole mini-batch). The
  loss's token selection depends only on detached values, so the update first
  computes detached log-probs/entropies of the whole mini-batch (one extra
  forward, skipped when there is a single micro-batch), then, per micro-batch,
  splices that micro-batch's live log-probs into the detached full arrays and
  differentiates the full-mini-batch loss. The splice keeps the detached values
  and takes only the gradient from the live ones (`_live_in`), so every
  micro-batch's loss sees the same numbers and makes the same selection, and
  the summed gradients equal the gradient of the one-shot loss.
  With `scope="microbatch"` (the released code's behaviour) every q consecutive
  rows of a shard (`scope_seqs`; the release: 4, each GPU's micro-batch) are
  a scope of their own, and the loss is the mean over the scopes: what verl
  computes, with each GPU selecting tokens in its own micro-batch and data
  parallelism averaging the gradients. The scope does not depend on the memory
  micro-batch: a scope larger than a micro-batch is spliced like the global one.
- Length-aware micro-batches: responses are padded to `max_new_tokens` (L),
  but a micro-batch is run through the model only up to its longest
  response, rounded up to one of `length_buckets` lengths ceil(L k / K).
  Each bucket is one branch of a `lax.switch` chosen on device from the
  rows' lengths (`resp_len`), so one program serves every step; each branch
  holds a whole forward + backward, so only the taken branch's activations
  exist (a switch inside the differentiated function would keep residuals
  for every branch). The trimmed log-probs are zero-padded back to L before
  the loss, so the loss, its token selection and its normalisers see the
  same [N, L] arrays as without trimming: exact (log-probs are causal, so
  the columns kept do not change). `length_order` sorts each shard's rows
  of each mini-batch by length (a permutation inside the shard, applied by
  the trainer under the global scope, where a mini-batch's loss does not
  depend on its row order), so most micro-batches are short.
- Only the trainable part of the params is differentiated, optimised and
  donated: all of them, or only the LoRA adapters when the params hold some
  (`entrl.models.lora.split`); the frozen base enters the jitted update as a
  separate argument that is neither differentiated nor donated (the KL
  reference shares its arrays). `make_update_fn` splits and joins, so callers
  pass and get back the whole params.
- A step whose loss or gradient norm is non-finite leaves params and optimizer
  state untouched (selected with `jnp.where` inside the jitted step, so the
  donated buffers are reused) and reports `skipped_nonfinite = 1`.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from entrl.models import lora
from entrl.rl import losses
from entrl.token_stats import (
    batched_response_stats,
    bucket_index,
    from_micro_rows,
    micro_rows,
    resp_lengths,
    response_buckets,
    trimmed_response_stats,
)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) settings of the update; part of the jit cache key."""

    loss_name: str = "sent"
    loss_params: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) overrides of the loss preset
    agg: str = "token-mean"
    scope: str = "global"  # global | microbatch
    scope_seqs: int = 0  # micro-batch scope: sequences per shard in one scope (0 = the micro-batch's p rows)
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    temperature: float = 1.0
    num_micro: int = 1  # micro-batches per mini-batch (gradient accumulation)
    shards: int = 1  # data shards the batch is split over (mesh.data * mesh.fsdp; see `micro_rows`)
    chunk_size: int = 512  # token chunk of the log-prob/entropy computation (benchmarks/bench_token_stats.py)
    length_buckets: int = 1  # micro-batch response lengths compiled: ceil(L k / K), k = 1..K (1 = always L)

    @property
    def params_dict(self) -> dict:
        return dict(self.loss_params)


# ---------------------------------------------------------------------------
# Row order (the log-prob phase itself is `entrl.token_stats.compute_logprobs`)
# ---------------------------------------------------------------------------


def length_order(lengths_N, shards: int, blocks: int) -> np.ndarray:
    """[N] host permutation: each shard's rows, block by block, in order of increasing length (stable).

    Shard s holds rows [s N/S, (s+1) N/S) split into `blocks` consecutive blocks (the mini-batches: see
    `micro_rows`); rows only move inside their block, so no row changes shard or mini-batch, and the
    micro-batches of a mini-batch, each shard's consecutive rows, become runs of similar length.
    """
    lengths_N = np.asarray(lengths_N)
    groups = lengths_N.reshape(shards * blocks, -1)
    order = np.argsort(groups, axis=1, kind="stable") + np.arange(groups.shape[0])[:, None] * groups.shape[1]
    return order.reshape(-1)


class _Partial:
    """A partial solution of the differencing method: `k` sets, heaviest first, each (total length,
    size, its (row, length) items). Compared as verl's sets are: by total, then size, then items."""

    __slots__ = ("sets",)

    def __init__(self, sets):
        self.sets = sorted(sets, reverse=True)

    @property
    def spread(self) -> int:
        return self.sets[0][0] - self.sets[-1][0]

    def __lt__(self, other: _Partial) -> bool:  # the heap pops the widest spread first, then the heavier
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]

    def merge(self, other: _Partial) -> _Partial:
        """Heaviest set with the other's lightest, and so on: the two spreads cancel as far as they can."""
        return _Partial((a[0] + b[0], a[1] + b[1], a[2] + b[2]) for a, b in zip(self.sets, reversed(other.sets)))


def balanced_shard_order(lengths_N, shards: int) -> np.ndarray:
    """[N] host permutation dealing the rows to `shards` equal-size sets of about equal total length, each set's
    rows in their original order, set s becoming shard s's rows: what verl's `balance_batch` does to the
    data-parallel ranks before they cut micro-batches, with its partitioner (Karmarkar-Karp's largest
    differencing method for k equal-size sets) and its order (the heaviest set to rank 0).

    The method: sort the rows by length (ties by row), make each run of `shards` consecutive rows a partial
    solution of one row per set, then merge the two partial solutions of widest spread (heaviest set with
    the lightest) until one is left.

    Under the micro-batch selection scope this decides which sequences share a scope: rows come grouped by
    prompt, so consecutive rows without it are half of one prompt's group (often all of one reward), with it
    mostly other prompts', as in the released runs on 8 GPUs. One shard: the identity (verl on one GPU).
    """
    lengths_N = np.asarray(lengths_N, np.int64)
    n = lengths_N.shape[0]
    if shards == 1 or n == 0:
        return np.arange(n)
    if n % shards:
        raise ValueError(f"{n} rows do not deal to {shards} equal sets")
    ranked = sorted((int(length), i) for i, length in enumerate(lengths_N))
    heap: list[_Partial] = []
    for j in range(0, n, shards):  # pushed one by one, as verl does: equal partials then pop in its order
        heapq.heappush(heap, _Partial((length, 1, ((i, length),)) for length, i in ranked[j:j + shards]))
    while len(heap) > 1:
        widest, next_widest = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, widest.merge(next_widest))
    return np.concatenate([sorted(i for i, _ in items) for _, _, items in heap[0].sets])


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------


def make_optimizer(*, lr: float, b1: float, b2: float, weight_decay: float, grad_clip: float,
                   schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping, linear warm-up and constant/cosine/linear decay."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps)
    elif schedule == "linear":
        sched = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: constant | cosine | linear")
    if warmup_steps:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), sched], [warmup_steps])
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Update
# ---------------------------------------------------------------------------

_BATCH_KEYS = ("prompt_ids", "prompt_mask", "resp_ids", "resp_mask", "old_logp", "ref_logp", "advantages")


def _policy_objective(logp_NxL, ent_NxL, mb: dict, rng, s: StepSettings):
    """Policy loss + reference KL on the arrays of one selection scope."""
    mask = mb["resp_mask"].astype(jnp.float32)
    adv_NxL = jnp.broadcast_to(mb["advantages"][:, None], logp_NxL.shape).astype(jnp.float32)
    max_len = logp_NxL.shape[1]
    loss, metrics = losses.compute_policy_loss(s.loss_name, logp_NxL, mb["old_logp"], adv_NxL, ent_NxL, mask,
                                          rng=rng, agg=s.agg, max_len=max_len, **s.params_dict)
    metrics = dict(metrics)
    metrics["pg_loss"] = loss
    if s.kl_coef > 0:
        kl = losses.aggregate(losses.kl_penalty(logp_NxL, mb["ref_logp"], s.kl_estimator), mask, s.agg, max_len=max_len)
        loss = loss + s.kl_coef * kl
        metrics["ref_kl"] = kl
    else:
        metrics["ref_kl"] = jnp.zeros((), jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    metrics["policy_entropy"] = jax.lax.stop_gradient((ent_NxL * mask).sum() / count)
    return loss, metrics


def _live_in(detached, live, i):
    """[n_micro, ...] `detached` with micro-batch i's gradient taken through `live`, its values unchanged.

    `live - stop_gradient(live)` is exactly 0, so every micro-batch's loss sees the same numbers (the
    detached pass's) and makes the same token selection, while the gradient flows through `live`.
    """
    here = jax.lax.dynamic_index_in_dim(detached, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(detached, here + (live - jax.lax.stop_gradient(live)), i, 0)


def _scope_keys(rng, first, count: int, shards: int):
    """[shards, count] keys of a shard's selection scopes first .. first + count - 1 (scope m of shard s:
    `split(fold_in(rng, m), shards)[s]`), so a scope's draw (clip_cov) does not depend on micro-batching."""
    keys = jax.vmap(lambda m: jax.random.split(jax.random.fold_in(rng, m), shards))(first + jnp.arange(count))
    return jnp.swapaxes(keys, 0, 1)


def _grads(graphdef, params, frozen, mb_all: dict, rng, s: StepSettings):
    """Loss, metrics and summed gradients (w.r.t. `params`, not `frozen`) over the micro-batches of one mini-batch.

    Selection scopes: the whole mini-batch (global), or per data shard, q = `scope_seqs` consecutive rows of
    each shard (micro-batch scope). With p rows per shard in a micro-batch, q <= p puts p / q scopes in each
    micro-batch; q > p spreads a scope over k = q / p consecutive micro-batches, each of which differentiates
    its scope's loss through its own rows (the others detached, as under the global scope).
    """
    n_micro, shards = s.num_micro, s.shards
    mb_all = dict(mb_all, resp_len=resp_lengths(mb_all))
    micro = {k: micro_rows(v, n_micro, shards) for k, v in mb_all.items()}  # [n_micro, N / n_micro, ...]
    p = mb_all["resp_ids"].shape[0] // (n_micro * shards)
    q = s.scope_seqs or p
    if s.scope == "microbatch" and (q % p and p % q):
        raise ValueError(f"selection scopes of {q} rows per shard do not tile micro-batches of {p} rows per shard")
    span = max(q // p, 1) if s.scope == "microbatch" else n_micro  # micro-batches one scope covers
    if span > 1:
        logp_sg, ent_sg = batched_response_stats(graphdef, lora.join(params, frozen), mb_all, temperature=s.temperature,
                                                 num_micro=n_micro, chunk_size=s.chunk_size, shards=shards,
                                                 length_buckets=s.length_buckets)
        logp_sg, ent_sg = micro_rows(logp_sg, n_micro, shards), micro_rows(ent_sg, n_micro, shards)

    def micro_loss(prm, i, length: int):
        model = nnx.merge(graphdef, prm, frozen)
        mb = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in micro.items()}
        logp, ent = trimmed_response_stats(model, mb, length, temperature=s.temperature, chunk_size=s.chunk_size)
        if s.scope == "global":
            if span > 1:  # the whole mini-batch, this micro-batch live (see module docstring)
                logp = from_micro_rows(_live_in(logp_sg, logp, i), shards)
                ent = from_micro_rows(_live_in(ent_sg, ent, i), shards)
            return _policy_objective(logp, ent, mb_all, rng, s)
        if span > 1:  # this micro-batch's scope: micro-batches j k .. j k + k - 1, this one live
            first = i // span * span
            group = lambda x: jax.lax.dynamic_slice_in_dim(x, first, span, 0)
            logp, ent = group(_live_in(logp_sg, logp, i)), group(_live_in(ent_sg, ent, i))
            mb = {k: group(v) for k, v in micro.items()}
            # [k, S p, ...] -> [S, k p, ...]: each shard's q rows, in row order
            by_scope = lambda x: jnp.swapaxes(x.reshape((span, shards, p) + x.shape[2:]), 0, 1).reshape(
                (shards, q) + x.shape[2:])
            keys = _scope_keys(rng, i // span, 1, shards).reshape(shards)
        else:  # p / q scopes of q rows per shard in this micro-batch
            per = p // q
            by_scope = lambda x: x.reshape((shards * per, q) + x.shape[1:])
            keys = _scope_keys(rng, i * per, per, shards).reshape(shards * per)
        loss, metrics = jax.vmap(lambda lp, en, b, k: _policy_objective(lp, en, b, k, s))(
            by_scope(logp), by_scope(ent), jax.tree.map(by_scope, mb), keys)
        return loss.mean() / (n_micro // span), jax.tree.map(jnp.mean, metrics)

    # One forward + backward per length bucket; micro-batch i takes the branch of its longest response.
    buckets = response_buckets(mb_all["resp_ids"].shape[1], s.length_buckets)
    branches = [lambda prm, i, b=b: jax.value_and_grad(micro_loss, has_aux=True)(prm, i, b) for b in buckets]

    def grad_fn(prm, i):
        if len(branches) == 1:
            return branches[0](prm, i)
        return jax.lax.switch(bucket_index(jax.lax.dynamic_index_in_dim(micro["resp_len"], i, keepdims=False),
                                           buckets), branches, prm, i)

    if n_micro == 1:
        (loss, metrics), grads = grad_fn(params, 0)
        return loss, metrics, grads

    def body(carry, i):
        loss_acc, g_acc = carry
        (loss, metrics), g = grad_fn(params, i)
        return (loss_acc + loss, jax.tree.map(jnp.add, g_acc, g)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), jnp.arange(n_micro))
    # A scope's loss was differentiated once per micro-batch it spans: its value is the per-call value.
    loss = loss / span
    metrics = jax.tree.map(lambda x: x.mean(0), metrics)
    return loss, metrics, grads


def update_step(graphdef, optimizer: optax.GradientTransformation, params, opt_state, minibatch: dict, rng,
                settings: StepSettings, frozen=None):
    """One optimizer step on one mini-batch. Pure; `make_update_fn` jits it.

    params: the trained params (all of them, or the LoRA adapters); frozen: the rest of the model's
    params (`entrl.models.lora.split`), None when nothing is frozen. Returns the new trained params.
    minibatch keys: prompt_ids/prompt_mask [N, P], resp_ids/resp_mask/old_logp/ref_logp [N, L],
    advantages [N] (broadcast over each response's tokens); optional resp_len [N] (the responses' lengths,
    which bound the trimmed forward; default: the extent of resp_mask).
    Returns (params, opt_state, metrics). Non-finite loss/gradients leave the state unchanged.
    """
    missing = [k for k in _BATCH_KEYS if k not in minibatch]
    if missing:
        raise ValueError(f"minibatch is missing {missing}")
    if minibatch["resp_ids"].shape[0] % (settings.num_micro * settings.shards):
        raise ValueError(f"mini-batch of {minibatch['resp_ids'].shape[0]} rows is not divisible into "
                         f"{settings.shards} shards x {settings.num_micro} micro-batches")
    frozen = nnx.State({}) if frozen is None else frozen
    loss, metrics, grads = _grads(graphdef, params, frozen, minibatch, rng, settings)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_opt = optimizer.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(ok, new, old) if hasattr(new, "dtype") else new
    new_params = jax.tree.map(keep, new_params, params)
    new_opt = jax.tree.map(keep, new_opt, opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped_nonfinite=(~ok).astype(jnp.float32))
    return new_params, new_opt, metrics


class Update:
    """`update(params, opt_state, minibatch, rng) -> (params, opt_state, metrics)` on the whole params: the
    trainable part (`entrl.models.lora.split`) and the optimizer state are donated and updated, the frozen
    rest is passed through as it is. `lower` takes the same arguments (for `entrl plan`)."""

    def __init__(self, jitted):
        self.jitted = jitted  # (trainable, opt_state, frozen, minibatch, rng) -> (trainable, opt_state, metrics)

    def __call__(self, params, opt_state, minibatch: dict, rng):
        trainable, frozen = lora.split(params)
        trainable, opt_state, metrics = self.jitted(trainable, opt_state, frozen, minibatch, rng)
        return lora.join(trainable, frozen), opt_state, metrics

    def lower(self, params, opt_state, minibatch: dict, rng):
        trainable, frozen = lora.split(params)
        return self.jitted.lower(trainable, opt_state, frozen, minibatch, rng)


def make_update_fn(graphdef, optimizer: optax.GradientTransformation, settings: StepSettings, *,
                   state_shardings=None) -> Update:
    """Jit `update_step` for one (model graph, optimizer, settings), donating the trained params and the
    optimizer state (the optimizer state is `optimizer.init(lora.trainable(params))`).

    `state_shardings` = (param_shardings, opt_shardings) pins the outputs to the inputs' shardings, so
    the state layout cannot drift between steps; None leaves placement to the compiler (single device).
    """
    fn = lambda trainable, opt_state, frozen, minibatch, rng: update_step(graphdef, optimizer, trainable, opt_state,
                                                                          minibatch, rng, settings, frozen)
    if state_shardings is None:
        return Update(jax.jit(fn, donate_argnums=(0, 1)))
    out = (lora.trainable(state_shardings[0]), state_shardings[1], None)
    return Update(jax.jit(fn, donate_argnums=(0, 1), out_shardings=out))
