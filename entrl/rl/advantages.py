"""Advantages for GRPO-family RL with verifiable rewards (docs/method.md, "Advantages").

Design decisions:
- Rewards arrive as one flat vector `[B * n]` with the n responses of a prompt
  contiguous; the group axis is recovered by a reshape (static `group_size`),
  so everything is jittable and there is no id -> group dictionary.
- The group std uses ddof = 1 and eps = 1e-6 outside the square root, as the
  official verl code (`compute_grpo_outcome_advantage`). A group of one
  response follows verl too: mean 0, std 1 (the advantage is the raw reward).
- The entropy-shaped advantage of "w/ Adv" lives here because it is an
  advantage transform; `entrl.rl.losses` applies it for the `entropy_adv` loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grpo_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
    """Group-relative advantages of GRPO (Shao et al. 2024) and Dr.GRPO (Liu et al. 2025).

    For each group g of `group_size` consecutive rewards R:

        A_i = (R_i - mean_g R) / (std_g R + eps)     (normalize_std=True, GRPO)
        A_i =  R_i - mean_g R                        (normalize_std=False, Dr.GRPO)

    with the unbiased std (ddof = 1). Groups whose rewards are all equal get A = 0.

    Args:
      rewards: `[B * n]` scalar rewards, the n responses of one prompt contiguous.
      group_size: n, responses per prompt (a Python int).
      normalize_std: divide by the group std (False = Dr.GRPO).
      eps: added to the std before dividing.

    Returns:
      `[B * n]` float32 advantages, one per response (broadcast them over the
      response's tokens with `broadcast_to_tokens`).
    """
    r_N = jnp.asarray(rewards, jnp.float32)
    if r_N.ndim != 1:
        raise ValueError(f"rewards must be a flat [B * n] vector, got shape {r_N.shape}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be a positive int")
    if r_N.shape[0] % group_size:
        raise ValueError(f"{r_N.shape[0]} rewards do not split into groups of {group_size}")
    if eps < 0:
        raise ValueError(f"eps={eps}: must be >= 0")
    r_BxG = r_N.reshape(-1, group_size)
    if group_size == 1:  # verl's convention for a lone response: mean 0, std 1
        mean_Bx1 = jnp.zeros_like(r_BxG)
        std_Bx1 = jnp.ones_like(r_BxG)
    else:
        mean_Bx1 = r_BxG.mean(axis=1, keepdims=True)
        std_Bx1 = r_BxG.std(axis=1, ddof=1, keepdims=True)
    adv_BxG = r_BxG - mean_Bx1
    if normalize_std:
        adv_BxG = adv_BxG / (std_Bx1 + eps)
    return adv_BxG.reshape(-1)


def broadcast_to_tokens(adv_B, mask_BxT):
    """Per-response advantages `[B]` -> per-token `[B, T]` (zero on masked tokens)."""
    adv_B = jnp.asarray(adv_B, jnp.float32)
    mask_BxT = jnp.asarray(mask_BxT)
    if adv_B.ndim != 1 or mask_BxT.ndim != 2 or adv_B.shape[0] != mask_BxT.shape[0]:
        raise ValueError(f"expected adv [B] and mask [B, T], got {adv_B.shape} and {mask_BxT.shape}")
    return jnp.where(mask_BxT.astype(bool), adv_B[:, None], 0.0)


def entropy_shaped_advantages(adv_BxT, entropy_BxT, mask_BxT, *, alpha: float = 0.4, kappa: float = 2.0):
    """Entropy-based advantage shaping, "w/ Adv" (Cheng et al. 2025, arXiv 2506.14758).

        A'_t = A_t + min(alpha * sg(H_t), |A_t| / kappa)

    The bonus is clipped by |A_t| / kappa so it can never flip the sign of A_t,
    and it is 0 where A_t = 0 (no shaping of zero-signal tokens) and on masked
    tokens (there A' = A). sg = stop-gradient: entropy only shapes the target.

    Args:
      adv_BxT, entropy_BxT, mask_BxT: `[B, T]` arrays.
      alpha: entropy scale (>= 0). kappa: clip divisor (> 0).
    """
    if not alpha >= 0:
        raise ValueError(f"alpha={alpha}: must be >= 0")
    if not kappa > 0:
        raise ValueError(f"kappa={kappa}: must be > 0")
    adv_BxT = jnp.asarray(adv_BxT, jnp.float32)
    ent_BxT = jax.lax.stop_gradient(jnp.asarray(entropy_BxT, jnp.float32))
    mask_BxT = jnp.asarray(mask_BxT)
    if not adv_BxT.shape == ent_BxT.shape == mask_BxT.shape:
        raise ValueError(f"shape mismatch: adv {adv_BxT.shape}, entropy {ent_BxT.shape}, mask {mask_BxT.shape}")
    valid_BxT = mask_BxT.astype(bool)
    shape_BxT = valid_BxT & (adv_BxT != 0)
    # Masked entropies may be garbage (NaN padding): select before computing.
    bonus_BxT = jnp.minimum(alpha * jnp.where(shape_BxT, ent_BxT, 0.0), jnp.abs(adv_BxT) / kappa)
    return adv_BxT + jnp.where(shape_BxT, bonus_BxT, 0.0)
