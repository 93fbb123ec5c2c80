"""Policy losses of SENT and of every baseline in its comparison; KL estimators; aggregation.

The math follows the SENT paper (Cao et al., arXiv 2512.04359) and the papers of
its baselines; each function's docstring states the formula it implements.

Design decisions:
- optax style: every loss is a pure function of per-token arrays `[B, T]` plus
  a mask, returning per-token values and the mask to aggregate them with;
  reduction (`aggregate`) is a separate step. `compute_policy_loss` composes the
  two and is what the trainer calls. Hyperparameters are Python scalars (static
  under jit), never config objects. A loss is declared once in `loss_specs`
  (name, preset, ranges, needs-entropy; importable without jax, so the config
  validates from it) and its function is registered here with `@loss_fn(name)`.
- Selection scope = everything passed in. Token selections ("the k lowest-entropy
  tokens", "top-k by covariance", "k random candidates") are rank based over the
  flattened masked scope: one `lax.sort` keyed by (is-masked, key, position), so
  masked tokens sort last, ties are broken by position, k is a traced int
  computed from the mask count, and there is no host round trip or Python loop
  over tokens. This works unchanged under `jax.vmap` (micro-batch scope).
- k = floor(frac * n) is computed exactly in int32 arithmetic from the decimal
  the user wrote (`Fraction(repr(frac))`). float32 is off by one on large scopes
  (floor(0.29f * 1807931) = 524300, exact 524299) and Python floats on small ones
  (the released code's int(0.29 * 100) = 28).
- Masked tokens are replaced by zeros before any arithmetic, so garbage (NaN,
  -inf padding log-probs) there can neither leak into the loss nor into the
  gradient; they get exactly zero gradient.
- `|x|` in the KL-style penalties is `_abs0`, with subgradient 0 at x = 0 (torch's
  convention). `jax.grad(jnp.abs)(0.)` is 1, which would push every log-prob down
  on the first on-policy mini-batch where logp == old exactly.
- The log-ratio is clamped to [-20, 20] before `exp` in every loss (verl's grpo
  does it; its kl_cov / clip_cov / SENT code does not). Inside the clamp the
  values are identical; outside it they differ only where the reference would
  overflow.
- Every loss returns the same metric keys (zeros where not applicable), so a
  trainer can stack them across micro-batches; see `METRIC_KEYS`.
- Left out on purpose: the reference-KL term (the trainer adds
  `kl_coef * aggregate(kl_penalty(...))`), and any gradient through entropy for
  the losses that only rank or shape with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from entrl.rl.advantages import entropy_shaped_advantages
from entrl.rl.loss_specs import AGG_MODES, KL_KINDS, LOSSES, PRESETS, resolve_params, validate_loss_params

__all__ = ["AGG_MODES", "KL_KINDS", "LOSSES", "METRIC_KEYS", "PRESETS", "aggregate", "clipped_pg",
           "compute_policy_loss", "kl_penalty", "loss_fn", "per_token_policy_loss", "resolve_params",
           "validate_loss_params"]

# ---------------------------------------------------------------------------
# Registration: every loss declared in `loss_specs` has exactly one function here
# ---------------------------------------------------------------------------

_LOSS_FNS: dict[str, Callable] = {}


def loss_fn(*names: str):
    """Register the decorated function as the math of the losses `names` (each declared in `LOSSES`)."""
    def register(fn: Callable) -> Callable:
        for name in names:
            if name not in LOSSES:
                raise KeyError(f"loss {name!r} has a function but no declaration in entrl.rl.loss_specs")
            if name in _LOSS_FNS:
                raise KeyError(f"loss {name!r} has two functions")
            _LOSS_FNS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------
# Aggregation (docs/method.md, "Aggregation")
# ---------------------------------------------------------------------------

def _safe_div(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def aggregate(values_BxT, mask_BxT, mode: str, *, max_len: int | None = None):
    """Reduce per-token values to a scalar over the valid tokens.

    With m the mask and S the sequences with at least one valid token:
      token-mean:               sum_bt m v / sum_bt m
      seq-mean-token-mean:      mean_{b in S} (sum_t m v / sum_t m)
      seq-mean-token-sum:       mean_{b in S} sum_t m v
      seq-mean-token-sum-norm:  mean_{b in S} sum_t m v / max_len   (Dr.GRPO, Liu et al. 2025:
                                a constant normaliser; max_len defaults to T. verl's version
                                sums over sequences instead of averaging: |S| times this)
    Fully masked sequences (padding rows) are left out of the sequence means; an
    all-masked input gives 0 (never NaN). All four are linear in `values`.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")
    values_BxT = jnp.asarray(values_BxT)
    mask_BxT = jnp.asarray(mask_BxT)
    if values_BxT.shape != mask_BxT.shape or values_BxT.ndim != 2:
        raise ValueError(f"expected values and mask of one shape [B, T], got {values_BxT.shape} and {mask_BxT.shape}")
    if max_len is not None and not max_len > 0:
        raise ValueError(f"max_len={max_len}: must be > 0")
    valid_BxT = mask_BxT.astype(bool)
    v_BxT = jnp.where(valid_BxT, values_BxT, 0.0).astype(jnp.float32)
    count_B = valid_BxT.sum(axis=1).astype(jnp.float32)
    if mode == "token-mean":
        return _safe_div(v_BxT.sum(), count_B.sum())
    if mode == "seq-mean-token-mean":
        seq_B = _safe_div(v_BxT.sum(axis=1), count_B)
    elif mode == "seq-mean-token-sum":
        seq_B = v_BxT.sum(axis=1)
    else:
        seq_B = v_BxT.sum(axis=1) / float(max_len if max_len is not None else values_BxT.shape[1])
    has_B = count_B > 0
    return _safe_div(jnp.where(has_B, seq_B, 0.0).sum(), has_B.sum().astype(jnp.float32))


# ---------------------------------------------------------------------------
# Reference KL (docs/method.md, "Reference KL")
# ---------------------------------------------------------------------------

def kl_penalty(logp, ref_logp, kind: str):
    """Per-token estimators of KL(pi || pi_ref) from the sampled token's log-probs (Schulman 2020).

      k1 = logp - ref
      k2 = 0.5 (logp - ref)^2
      k3 = clamp(exp(d) - d - 1, -10, 10),  d = clamp(ref - logp, -20, 20)   (verl "low_var_kl")
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"shape mismatch: logp {logp.shape}, ref_logp {ref_logp.shape}")
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

LOGRATIO_CLAMP = 20.0


def _abs0(x):
    """|x| with subgradient 0 at x = 0 (torch's convention)."""
    return jnp.where(x == 0, 0.0, jnp.abs(x))


def _as_fraction(frac: float | Fraction) -> Fraction:
    """The decimal the user wrote, as p/q with p * q < 2**31 (so `_floor_frac` stays in int32).

    Decimals with up to ~4 significant digits are exact; anything else is the closest
    fraction under that bound (relative error < 1e-9).
    """
    f = frac if isinstance(frac, Fraction) else Fraction(repr(float(frac)))
    if f.numerator * f.denominator < 2**31:
        return f
    den = math.isqrt(int(2**31 / float(f))) + 1
    while True:
        g = f.limit_denominator(den)
        if g.numerator * g.denominator < 2**31:
            return g
        den //= 2


def _floor_frac(frac: Fraction, n, *, ceil: bool = False):
    """floor(frac * n) (or ceil) exactly, for a static fraction in [0, 1] and a traced int32 n."""
    p, q = frac.numerator, frac.denominator
    n = n.astype(jnp.int32)
    part = (n % q) * p  # < q * p < 2**31
    out = (n // q) * p + part // q
    if ceil:
        out = out + (part % q != 0).astype(jnp.int32)
    return out


def _select_smallest(key_N, member_N, k):
    """Boolean mask of the k members with the smallest key (ties: lower position first).

    One sort keyed by (non-member, key, position); non-members sort last whatever
    their key. Selects min(k, number of members) entries.
    """
    n_tok = key_N.shape[0]
    pos_N = jnp.arange(n_tok, dtype=jnp.int32)
    key_N = jnp.where(member_N, key_N, 0.0)
    key_N = jnp.where(key_N == 0, 0.0, key_N)  # -0.0 == 0.0 is a tie, not an order
    _, _, order_N = lax.sort((jnp.logical_not(member_N).astype(jnp.int32), key_N, pos_N), num_keys=3)
    rank_N = jnp.zeros((n_tok,), jnp.int32).at[order_N].set(pos_N)
    return member_N & (rank_N < k)


def _masked_mean(x_N, m_N):
    return _safe_div(jnp.where(m_N, x_N, 0.0).sum(), m_N.sum().astype(jnp.float32))


def _covariance(adv_N, logp_N, set_N):
    """c_t = (A_t - mean_S A)(logp_t - mean_S logp) over the set S, detached (0 outside S)."""
    adv_N, logp_N = lax.stop_gradient(adv_N), lax.stop_gradient(logp_N)
    c_N = (adv_N - _masked_mean(adv_N, set_N)) * (logp_N - _masked_mean(logp_N, set_N))
    return jnp.where(set_N, c_N, 0.0)


def _ratio(logratio_N):
    return jnp.exp(jnp.clip(logratio_N, -LOGRATIO_CLAMP, LOGRATIO_CLAMP))


def clipped_pg(adv, logratio, *, clip_low: float, clip_high: float, dual_clip: float):
    """GRPO/PPO clipped surrogate per token, with dual clip (docs/method.md, "Baselines").

      r = exp(clamp(logp - old, -20, 20))
      pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
      pg = min(pg, -A * dual_clip)   where A < 0            (Ye et al. 2020, dual-clip PPO)

    clip_low = clip_high = 0.2 is GRPO; clip_high = 0.28 is DAPO's clip-higher.
    Returns (pg, clipped, dual_clipped): the per-token term, where the PPO clip was
    active (clipped term strictly larger) and where the dual clip was active.
    """
    ratio = _ratio(logratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_clip = jnp.maximum(pg1, pg2)
    if math.isinf(dual_clip):  # dual clip off; -0 * inf would be NaN
        return pg_clip, pg2 > pg1, jnp.zeros(pg_clip.shape, bool)
    pg3 = -adv * dual_clip
    neg = adv < 0
    pg = jnp.where(neg, jnp.minimum(pg_clip, pg3), pg_clip)
    return pg, pg2 > pg1, neg & (pg_clip > pg3)


# ---------------------------------------------------------------------------
# Losses. Each takes flat [N] arrays (masked entries already zero), a boolean
# valid mask, an optional RNG key and its hyperparameters; returns
# (values_N, agg_mask_N, stats) with stats a dict of boolean/float arrays.
# ---------------------------------------------------------------------------


@loss_fn("grpo")
def _grpo(logp, old, adv, ent, valid, rng, *, clip_low, clip_high, dual_clip):
    """`grpo`: the clipped surrogate of `clipped_pg` on every valid token."""
    pg, clipped, dual = clipped_pg(adv, logp - old, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    return pg, valid, {"clipped": clipped, "dual": dual}


def _sent_term(logp, old, adv, valid, set_N, *, kcov, beta, base_mult, high_mult, low_mult, pg,
               clip_low, clip_high, dual_clip):
    """SENT's token term on a token set S (S = L for `sent`, the high-entropy set for `high_en`)."""
    logratio = logp - old
    if pg == "clip":
        pg_N, clipped, dual = clipped_pg(adv, logratio, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    else:
        pg_N, clipped, dual = -adv * _ratio(logratio), jnp.zeros_like(valid), jnp.zeros_like(valid)
    c_N = _covariance(adv, logp, set_N)
    k_c = jnp.maximum(1, _floor_frac(_as_fraction(kcov), set_N.sum()))
    high = _select_smallest(-c_N, set_N, k_c)
    low = _select_smallest(c_N, set_N, k_c)
    w_N = jnp.where(low, low_mult, jnp.where(high, high_mult, jnp.where(set_N, base_mult, 0.0)))
    values = pg_N + (w_N * beta) * _abs0(logratio)
    stats = {"clipped": clipped, "dual": dual, "penalized": w_N * beta > 0, "cov": c_N, "cov_set": set_N,
             "selected": set_N}
    return values, valid, stats


@loss_fn("sent", "sent_released")
def _sent(logp, old, adv, ent, valid, rng, *, rho, **hp):
    """`sent` / `sent_released`: KL-style constraint on low-entropy tokens (Cao et al. 2025; docs/method.md).

    With n valid tokens in scope:
      L   = the k_L = max(1, floor(rho n)) valid tokens of lowest sg(H) (ties by position)
      c_t = (A_t - mean_L A)(logp_t - mean_L logp), detached, t in L
      k_c = max(1, floor(kcov |L|)); high-cov = top-k_c of L by c, low-cov = bottom-k_c
            (ties by position; a token in both is low-cov, as released)
      w_t = high_mult | low_mult | base_mult (rest of L) | 0 (outside L)
      l_t = pg_t + w_t beta |logp_t - old_t|,  pg_t = -A_t r_t  (pg="unclipped") or the
            GRPO clipped term (pg="clip"); |.| has subgradient 0 at 0.

    The released code (zldscr0/SENT, `compute_policy_loss_low_entropy_kl_cov_v2`)
    gathers `advantages[response_mask]` with an *integer* mask: in torch/numpy that is
    an integer gather of rows 0/1 of `advantages` (shape B x T x T), not a boolean
    selection, so its covariance is computed on scrambled values and the high/low-cov
    tokens it penalises are effectively arbitrary. entrl uses the boolean mask
    (tests/test_losses.py reproduces the difference on a small example). Two smaller
    differences from the release: ties are broken by position (torch.topk's order is
    unspecified) and the ratio's log is clamped to [-20, 20].
    """
    n = valid.sum()
    k_L = jnp.maximum(1, _floor_frac(_as_fraction(rho), n))
    low_ent = _select_smallest(lax.stop_gradient(ent), valid, k_L)
    return _sent_term(logp, old, adv, valid, low_ent, **hp)


@loss_fn("high_en")
def _high_en(logp, old, adv, ent, valid, rng, *, rho, **hp):
    """`high_en` (ablation "w/ High_En"): SENT's term on the k_H = max(1, floor((1 - rho) n))
    valid tokens of highest sg(H) (ties by position) instead of the low-entropy set."""
    n = valid.sum()
    k_H = jnp.maximum(1, _floor_frac(1 - _as_fraction(rho), n))
    high_ent = _select_smallest(-lax.stop_gradient(ent), valid, k_H)
    return _sent_term(logp, old, adv, valid, high_ent, **hp)


@loss_fn("kl_cov", "kl_cov_verl")
def _kl_cov(logp, old, adv, ent, valid, rng, *, kcov, beta):
    """`kl_cov` / `kl_cov_verl` ("w/ Cov", Cui et al. 2025, arXiv 2505.22617). No PPO clip.

      cov_t = (A_t - mean A)(logp_t - mean logp) over the valid tokens, detached
      the top k = max(1, floor(kcov n)) valid tokens by cov (ties by position) get
      l_t = -A_t r_t + beta |logp_t - old_t|; the others l_t = -A_t r_t.
    """
    logratio = logp - old
    c_N = _covariance(adv, logp, valid)
    k = jnp.maximum(1, _floor_frac(_as_fraction(kcov), valid.sum()))
    top = _select_smallest(-c_N, valid, k)
    values = -adv * _ratio(logratio) + jnp.where(top, beta, 0.0) * _abs0(logratio)
    return values, valid, {"penalized": top & (beta > 0), "cov": c_N, "cov_set": valid}


@loss_fn("clip_cov")
def _clip_cov(logp, old, adv, ent, valid, rng, *, clip_low, clip_high, ratio, cov_lb, cov_ub):
    """`clip_cov` ("w/ Clip", Cui et al. 2025, arXiv 2505.22617), as in verl.

      pg_t  = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))   (no dual clip, as verl;
              the preset's clip_low = clip_high = 1 is the authors' recipe: r in [0, 2])
      cov_t = (A_t - mean A)(logp_t - mean logp) over the valid tokens, detached
      candidates: valid, not already clipped by the PPO clip, cov_lb < cov_t < cov_ub
      min(max(1, floor(ratio n)), #candidates) candidates drawn uniformly at random
      (from `rng`) get l_t = 0 (no gradient); the rest l_t = pg_t.
    """
    if rng is None:
        raise ValueError("loss 'clip_cov' draws tokens at random: pass rng=<jax PRNG key>")
    r_N = _ratio(logp - old)
    pg1 = -adv * r_N
    pg2 = -adv * jnp.clip(r_N, 1.0 - clip_low, 1.0 + clip_high)
    clipped = valid & (pg2 > pg1)
    c_N = _covariance(adv, logp, valid)
    cand = valid & ~clipped & (c_N > cov_lb) & (c_N < cov_ub)
    k = jnp.maximum(1, _floor_frac(_as_fraction(ratio), valid.sum()))
    u_N = jax.random.uniform(rng, valid.shape)
    chosen = _select_smallest(u_N, cand, k)
    values = jnp.where(chosen, 0.0, jnp.maximum(pg1, pg2))
    return values, valid, {"clipped": clipped, "penalized": chosen, "cov": c_N, "cov_set": valid}


@loss_fn("entropy_bonus")
def _entropy_bonus(logp, old, adv, ent, valid, rng, *, coef, **clip):
    """`entropy_bonus` ("w/ En"): l_t = pg_t - coef H_t, gradient through H_t.

    Equals `agg(pg) - coef * agg(H)` for every aggregation mode (they are linear).
    """
    pg, clipped, dual = clipped_pg(adv, logp - old, **clip)
    return pg - coef * ent, valid, {"clipped": clipped, "dual": dual}


@loss_fn("entropy_adv")
def _entropy_adv(logp, old, adv, ent, valid, rng, *, alpha, kappa, **clip):
    """`entropy_adv` ("w/ Adv", Cheng et al. 2025): the GRPO term with
    A'_t = A_t + min(alpha sg(H_t), |A_t| / kappa) (see `entropy_shaped_advantages`)."""
    adv2 = entropy_shaped_advantages(adv[None], ent[None], valid[None], alpha=alpha, kappa=kappa)[0]
    pg, clipped, dual = clipped_pg(adv2, logp - old, **clip)
    return pg, valid, {"clipped": clipped, "dual": dual}


@loss_fn("high_entropy_mask")
def _high_entropy_mask(logp, old, adv, ent, valid, rng, *, top_frac, **clip):
    """`high_entropy_mask` ("w/ Mask", Wang et al. 2025, arXiv 2506.01939): the GRPO term
    only on the ceil(top_frac n) valid tokens of highest sg(H) (ties by position);
    the loss is aggregated over those tokens only."""
    k = _floor_frac(_as_fraction(top_frac), valid.sum(), ceil=True)
    sel = _select_smallest(-lax.stop_gradient(ent), valid, k)
    pg, clipped, dual = clipped_pg(adv, logp - old, **clip)
    return pg, sel, {"clipped": clipped & sel, "dual": dual & sel, "selected": sel}


_UNREGISTERED = set(LOSSES) ^ set(_LOSS_FNS)
if _UNREGISTERED:  # a declaration without a function (or the reverse) is a bug of entrl, found at import
    raise ImportError(f"losses declared but without a function (or the reverse): {sorted(_UNREGISTERED)}")

METRIC_KEYS = ("n_valid", "penalized_frac", "clip_frac", "dual_clip_frac", "selected_frac",
               "abs_logratio_mean", "cov_mean", "cov_max")


def _metrics(valid, logp, old, stats: dict) -> dict:
    """The shared metric dict (float32 scalars). Fractions are of the valid tokens in scope.

    n_valid: valid tokens in scope; penalized_frac: tokens that got a KL/cov penalty
    (clip_cov: tokens whose gradient was zeroed); clip_frac / dual_clip_frac: PPO clip /
    dual clip active; selected_frac: tokens in the loss's token set (SENT's L, the
    high-entropy set; 1 when the loss uses every token); abs_logratio_mean: mean
    |logp - old|; cov_mean / cov_max: the covariance statistics the selection used
    (over L for sent, over the valid tokens for kl_cov / clip_cov; 0 otherwise).
    """
    n = valid.sum().astype(jnp.float32)
    none = jnp.zeros_like(valid)

    def frac(m):
        return _safe_div((m & valid).sum().astype(jnp.float32), n)

    cov_set = stats.get("cov_set", none)
    cov = stats.get("cov", jnp.zeros(valid.shape, jnp.float32))
    has_cov = cov_set.any()
    return {
        "n_valid": n,
        "penalized_frac": frac(stats.get("penalized", none)),
        "clip_frac": frac(stats.get("clipped", none)),
        "dual_clip_frac": frac(stats.get("dual", none)),
        "selected_frac": frac(stats.get("selected", valid)),
        "abs_logratio_mean": _masked_mean(jnp.abs(logp - old), valid),
        "cov_mean": _masked_mean(cov, cov_set),
        "cov_max": jnp.where(has_cov, jnp.max(jnp.where(cov_set, cov, -jnp.inf)), 0.0),
    }


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def per_token_policy_loss(name: str, logp, old_logp, advantages, entropy, mask, *, rng=None, **hyperparams):
    """Per-token policy loss of the named loss, unreduced.

    Args:
      name: a loss declared in `entrl.rl.loss_specs.LOSSES`.
      logp, old_logp, advantages, entropy, mask: `[B, T]`; the selection scope is
        everything passed in. `entropy` may be None for losses that do not use it.
        `mask` is boolean or 0/1 (nonzero = valid token).
      rng: PRNG key (required by clip_cov only).
      **hyperparams: Python scalars overriding the loss's preset (`LOSSES[name].preset`).

    Returns:
      (values_BxT, agg_mask_BxT, metrics): per-token losses (0 outside agg_mask), the
      boolean mask to aggregate them with (the valid tokens; the selected tokens for
      high_entropy_mask) and the metric dict of `METRIC_KEYS` (float32 scalars).
    """
    if name not in _LOSS_FNS:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(_LOSS_FNS)}")
    hp = resolve_params(name, hyperparams)
    if entropy is None:
        if LOSSES[name].needs_entropy:
            raise ValueError(f"loss {name!r} needs the token entropies")
        entropy = jnp.zeros(jnp.shape(logp), jnp.float32)
    arrays = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "entropy": entropy, "mask": mask}
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or len(shapes["logp"]) != 2:
        raise ValueError("all inputs must have one shape [B, T]; got "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))
    shape = shapes["logp"]
    valid = jnp.asarray(mask).astype(bool).reshape(-1)

    def flat(x):  # masked entries -> 0 so padding garbage reaches neither loss nor gradient
        return jnp.where(valid, jnp.asarray(x).astype(jnp.float32).reshape(-1), 0.0)

    logp_N, old_N, adv_N, ent_N = flat(logp), flat(old_logp), flat(advantages), flat(entropy)
    values_N, agg_N, stats = _LOSS_FNS[name](logp_N, old_N, adv_N, ent_N, valid, rng, **hp)
    values_N = jnp.where(agg_N, values_N, 0.0)
    metrics = _metrics(valid, lax.stop_gradient(logp_N), old_N, jax.tree.map(lax.stop_gradient, stats))
    return values_N.reshape(shape), agg_N.reshape(shape), metrics


def compute_policy_loss(name: str, logp, old_logp, advantages, entropy, mask, *, rng=None,
                        agg: str = "token-mean", max_len: int | None = None, **hyperparams):
    """Aggregated policy loss (before the reference-KL term) and its metrics.

    `per_token_policy_loss` followed by `aggregate(values, agg_mask, agg, max_len=max_len)`.
    All arrays `[B, T]`; the selection scope is everything passed in (call it on a
    whole mini-batch for global scope, or `jax.vmap` it over a leading micro-batch
    axis for micro-batch scope). An all-masked input gives loss 0 and n_valid 0.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGG_MODES)}")
    values, agg_mask, metrics = per_token_policy_loss(name, logp, old_logp, advantages, entropy, mask,
                                                      rng=rng, **hyperparams)
    return aggregate(values, agg_mask, agg, max_len=max_len), metrics
