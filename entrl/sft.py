"""Supervised warm-start: next-token cross-entropy on (prompt, response) pairs.

Used by the demo to give the tiny policy non-trivial accuracy before RL, and
usable on its own for a short SFT of any entrl model. The loss is the mean
negative log-probability of the response tokens (prompt tokens are context
only), computed with the same `response_stats` as the RL update, so the chunked
token statistics and the prompt/response layout are shared with training.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from entrl.token_stats import response_stats

log = logging.getLogger("entrl.sft")


def pad_pairs(prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, prompt_len: int,
              response_len: int):
    """Left-pad prompts to `prompt_len`, right-pad responses to `response_len` (too long -> ValueError)."""
    n = len(prompts)
    p_ids = np.full((n, prompt_len), pad_id, np.int32)
    p_mask = np.zeros((n, prompt_len), np.int32)
    r_ids = np.full((n, response_len), pad_id, np.int32)
    r_mask = np.zeros((n, response_len), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) > prompt_len or len(r) > response_len or not p:
            raise ValueError(f"pair {i}: prompt {len(p)} / response {len(r)} tokens do not fit "
                             f"prompt_len={prompt_len} / response_len={response_len}")
        p_ids[i, prompt_len - len(p):] = p
        p_mask[i, prompt_len - len(p):] = 1
        r_ids[i, :len(r)] = r
        r_mask[i, :len(r)] = 1
    return p_ids, p_mask, r_ids, r_mask


def make_sft_step(graphdef, optimizer: optax.GradientTransformation):
    """Jitted `(params, opt_state, batch) -> (params, opt_state, loss)` with donated state."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logp, _ = response_stats(model, batch["prompt_ids"], batch["prompt_mask"], batch["resp_ids"], temperature=1.0)
        mask = batch["resp_mask"].astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def train_sft(graphdef, params, prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, steps: int,
              batch_size: int, lr: float, seed: int = 0, prompt_len: int | None = None,
              response_len: int | None = None, weight_decay: float = 0.0, log_every: int = 50):
    """Run `steps` SFT steps over shuffled (prompt, response) pairs. Returns (params, losses)."""
    if not prompts or len(prompts) != len(responses):
        raise ValueError("train_sft needs the same non-zero number of prompts and responses")
    prompt_len = prompt_len or max(map(len, prompts))
    response_len = response_len or max(map(len, responses))
    data = pad_pairs(prompts, responses, pad_id=pad_id, prompt_len=prompt_len, response_len=response_len)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.1),
                                        weight_decay=weight_decay))
    opt_state = jax.jit(optimizer.init)(params)
    step_fn = make_sft_step(graphdef, optimizer)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(steps * batch_size // len(prompts) + 1)])
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        batch = dict(zip(("prompt_ids", "prompt_mask", "resp_ids", "resp_mask"), (jnp.asarray(x[idx]) for x in data)))
        params, opt_state, loss = step_fn(params, opt_state, batch)
        if (s + 1) % log_every == 0 or s == steps - 1:
            losses.append(float(loss))
            log.info("sft step %d/%d loss %.4f (%.1f s)", s + 1, steps, losses[-1], time.perf_counter() - t0)
    return params, losses
