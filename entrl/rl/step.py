"""The pure, jitted pieces of an RL step: sequence log-probs and the update.

Design decisions:
- The model crosses the jit boundary as `(graphdef, params)` (NNX split); it is
  merged inside. `graphdef` and `StepSettings` are static, so nothing recompiles
  between RL steps of the same shapes.
- A rollout row is `prompt (left-padded, P) ++ response (L)`. One forward over
  `P + L - 1` tokens gives the hidden states that predict the L response tokens;
  per-token log-prob and entropy come from `token_stats` in chunks, so the
  `[N, L, V]` logits never exist in float32.
- Gradient accumulation over micro-batches with a *global* selection scope
  (SENT's default: quantiles and covariances over the whole mini-batch). The
  loss's token selection depends only on detached values, so the update first
  computes detached log-probs/entropies of the whole mini-batch (one extra
  forward, skipped when there is a single micro-batch), then, per micro-batch,
  splices that micro-batch's live log-probs into the detached full arrays and
  differentiates the full-mini-batch loss. The selection is identical for every
  micro-batch and the summed gradients equal the gradient of the one-shot loss.
  With `scope="microbatch"` (the released code's behaviour) each micro-batch is
  its own scope and the loss is the mean over micro-batches, as verl does.
- A step whose loss or gradient norm is non-finite leaves params and optimizer
  state untouched (selected with `jnp.where` inside the jitted step, so the
  donated buffers are reused) and reports `skipped_nonfinite = 1`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entrl.rl import losses as L
from entrl.token_stats import token_logprobs_and_entropy


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) settings of the update; part of the jit cache key."""

    loss_name: str = "sent"
    loss_params: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) overrides of the loss preset
    agg: str = "token-mean"
    scope: str = "global"  # global | microbatch
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    temperature: float = 1.0
    num_micro: int = 1  # micro-batches per mini-batch (gradient accumulation)
    chunk_size: int = 512  # token chunk of the log-prob/entropy computation (benchmarks/bench_token_stats.py)

    @property
    def params_dict(self) -> dict:
        return dict(self.loss_params)


# ---------------------------------------------------------------------------
# Sequence statistics
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


def _micro_split(x, num_micro: int):
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])


def batched_response_stats(graphdef, params, batch: dict, *, temperature: float, num_micro: int, chunk_size: int):
    """Detached log-probs/entropies of a whole batch, one micro-batch at a time (lax.map)."""
    model = nnx.merge(graphdef, params)

    def one(mb):
        return response_stats(model, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"],
                              temperature=temperature, chunk_size=chunk_size)

    parts = {k: _micro_split(batch[k], num_micro) for k in ("prompt_ids", "prompt_mask", "resp_ids")}
    logp, ent = jax.lax.map(one, parts)
    merge = lambda x: x.reshape((-1,) + x.shape[2:])
    return jax.lax.stop_gradient(merge(logp)), jax.lax.stop_gradient(merge(ent))


compute_logprobs = jax.jit(batched_response_stats, static_argnames=("graphdef", "temperature", "num_micro", "chunk_size"))


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
    loss, metrics = L.compute_policy_loss(s.loss_name, logp_NxL, mb["old_logp"], adv_NxL, ent_NxL, mask,
                                          rng=rng, agg=s.agg, max_len=max_len, **s.params_dict)
    metrics = dict(metrics)
    metrics["pg_loss"] = loss
    if s.kl_coef > 0:
        kl = L.aggregate(L.kl_penalty(logp_NxL, mb["ref_logp"], s.kl_estimator), mask, s.agg, max_len=max_len)
        loss = loss + s.kl_coef * kl
        metrics["ref_kl"] = kl
    else:
        metrics["ref_kl"] = jnp.zeros((), jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    metrics["policy_entropy"] = jax.lax.stop_gradient((ent_NxL * mask).sum() / count)
    return loss, metrics


def _grads(graphdef, params, mb_all: dict, rng, s: StepSettings):
    """Loss, metrics and summed gradients over the micro-batches of one mini-batch."""
    n_micro = s.num_micro
    N = mb_all["resp_ids"].shape[0]
    m = N // n_micro

    if s.scope == "global" and n_micro > 1:
        logp_sg, ent_sg = batched_response_stats(graphdef, params, mb_all, temperature=s.temperature,
                                                 num_micro=n_micro, chunk_size=s.chunk_size)
    else:
        logp_sg = ent_sg = None

    def micro_loss(p, i):
        model = nnx.merge(graphdef, p)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * m, m, axis=0)
        mb = {k: sl(v) for k, v in mb_all.items()}
        logp, ent = response_stats(model, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"],
                                   temperature=s.temperature, chunk_size=s.chunk_size)
        if s.scope == "global" and n_micro > 1:
            # Splice the live values into the detached full arrays (see module docstring).
            logp_full = jax.lax.dynamic_update_slice_in_dim(logp_sg, logp, i * m, axis=0)
            ent_full = jax.lax.dynamic_update_slice_in_dim(ent_sg, ent, i * m, axis=0)
            return _policy_objective(logp_full, ent_full, mb_all, rng, s)
        # Micro-batch scope: an independent draw per micro-batch (clip_cov's random choice).
        loss, metrics = _policy_objective(logp, ent, mb, jax.random.fold_in(rng, i), s)
        return loss / n_micro, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if n_micro == 1:
        (loss, metrics), grads = grad_fn(params, 0)
        return loss, metrics, grads

    def body(carry, i):
        loss_acc, g_acc = carry
        (loss, metrics), g = grad_fn(params, i)
        return (loss_acc + loss, jax.tree.map(jnp.add, g_acc, g)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), jnp.arange(n_micro))
    if s.scope == "global":
        # Every micro-batch differentiated the same full-mini-batch loss: its value is the per-call value.
        loss = loss / n_micro
    metrics = jax.tree.map(lambda x: x.mean(0), metrics)
    return loss, metrics, grads


def update_step(graphdef, optimizer: optax.GradientTransformation, params, opt_state, minibatch: dict, rng,
                settings: StepSettings):
    """One optimizer step on one mini-batch. Pure; jit with `jit_update_step`.

    minibatch keys: prompt_ids/prompt_mask [N, P], resp_ids/resp_mask/old_logp/ref_logp [N, L],
    advantages [N] (broadcast over each response's tokens).
    Returns (params, opt_state, metrics). Non-finite loss/gradients leave the state unchanged.
    """
    missing = [k for k in _BATCH_KEYS if k not in minibatch]
    if missing:
        raise ValueError(f"minibatch is missing {missing}")
    if minibatch["resp_ids"].shape[0] % settings.num_micro:
        raise ValueError(f"mini-batch of {minibatch['resp_ids'].shape[0]} rows is not divisible into "
                         f"{settings.num_micro} micro-batches")
    loss, metrics, grads = _grads(graphdef, params, minibatch, rng, settings)
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


def make_update_fn(graphdef, optimizer: optax.GradientTransformation, settings: StepSettings, *,
                   state_shardings=None):
    """Jit `update_step` for one (model graph, optimizer, settings), donating params and optimizer state.

    `state_shardings` = (param_shardings, opt_shardings) pins the outputs to the inputs' shardings, so
    the state layout cannot drift between steps; None leaves placement to the compiler (single device).
    """
    fn = lambda params, opt_state, minibatch, rng: update_step(graphdef, optimizer, params, opt_state, minibatch,
                                                               rng, settings)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=(0, 1))
    out = (state_shardings[0], state_shardings[1], None)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=out)
