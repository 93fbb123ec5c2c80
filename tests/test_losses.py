"""Tests of entrl.rl.losses.

Tiers: hand-computed values written from the formulas of docs/method.md (not from the code);
an independent NumPy reference of every loss compared with the jitted, vmapped JAX
version on many random inputs (ties, masked rows, single-token scopes); gradients;
the released code's integer-mask gather; jit == eager; bad input.

Compile time dominates on CPU, so the random comparisons run every loss config in
one jitted, vmapped function (`_batched`), and hand examples share one shape [1, 6].
"""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrl import config as C
from entrl.rl import losses as L
from entrl.rl.loss_specs import LOSSES

E = math.exp
KEY = jax.random.key(0)

# ---------------------------------------------------------------------------
# The SENT example: 5 valid tokens + 1 masked token full of garbage.
#   H     = 0.1  2.0  0.3  0.2  0.4 | nan
#   A     = 1    1   -1    1   -1   | nan
#   logp  = -1  -1   -2   -0.5 -1   | nan
#   lr    = 0.1  0.2 -0.1  0.0  0.3 | (old = logp - lr)
# L (rho 0.8, k_L = 4) = {0, 2, 3, 4}; mean_L A = 0; mean_L logp = -1.125
# c over L = 0.125, 0.875, 0.625, -0.125 -> high-cov t2, low-cov t4 (k_c = 1).
# Over all 5 valid tokens: mean A = 0.2, mean logp = -1.1,
# cov = 0.08, 0.08, 1.08, 0.48, -0.12.
# ---------------------------------------------------------------------------

NAN = float("nan")
H6 = np.array([[0.1, 2.0, 0.3, 0.2, 0.4, NAN]], np.float32)
A6 = np.array([[1.0, 1.0, -1.0, 1.0, -1.0, NAN]], np.float32)
LP6 = np.array([[-1.0, -1.0, -2.0, -0.5, -1.0, NAN]], np.float32)
LR6 = np.array([0.1, 0.2, -0.1, 0.0, 0.3], np.float64)
OLD6 = np.array([[-1.1, -1.2, -1.9, -0.5, -1.3, NAN]], np.float32)
M6 = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
R = np.exp(LR6)  # ratios of the 5 valid tokens


def run6(name, **hp):
    values, agg_mask, metrics = L.per_token_policy_loss(name, LP6, OLD6, A6, H6, M6, rng=KEY, **hp)
    loss, metrics2 = L.compute_policy_loss(name, LP6, OLD6, A6, H6, M6, rng=KEY, **hp)
    assert np.isfinite(np.asarray(values)).all()
    for k in metrics:
        np.testing.assert_array_equal(metrics[k], metrics2[k])
    return np.asarray(values)[0], np.asarray(agg_mask)[0], float(loss), {k: float(v) for k, v in metrics.items()}


def close(a, b, tol=2e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Hand-computed values, one per loss
# ---------------------------------------------------------------------------


def test_sent_hand_computed():
    v, agg, loss, m = run6("sent")  # base 1, high 2, low 0.5, beta 0.1, unclipped -A r
    pg = [-R[0], -R[1], R[2], -1.0, R[4]]
    pen = [1 * 0.1 * 0.1, 0.0, 2 * 0.1 * 0.1, 1 * 0.1 * 0.0, 0.5 * 0.1 * 0.3]
    close(v[:5], np.add(pg, pen))
    assert v[5] == 0 and agg.tolist() == [True] * 5 + [False]
    close(loss, sum(pg + np.array(pen)) / 5)
    close([m["n_valid"], m["penalized_frac"], m["selected_frac"], m["clip_frac"]], [5, 0.8, 0.8, 0])
    close([m["cov_mean"], m["cov_max"], m["abs_logratio_mean"]], [1.5 / 4, 0.875, 0.7 / 5])


def test_sent_released_hand_computed():
    v, _, loss, m = run6("sent_released")  # base 0, kcov 0.0002 -> one high, one low token
    close(v[:5], [-R[0], -R[1], R[2] + 0.02, -1.0, R[4] + 0.015])
    close(m["penalized_frac"], 0.4)


def test_sent_clipped_pg_option():
    v, _, _, m = run6("sent", pg="clip")
    # GRPO term: t1 (A=1, r=1.221 > 1.2) is clipped to -1.2; t4 (A=-1, r=1.35) keeps -A r.
    close(v[:5], [-R[0] + 0.01, -1.2, R[2] + 0.02, -1.0, R[4] + 0.015])
    close(m["clip_frac"], 0.2)


def test_sent_lowcov_wins_on_overlap_and_single_token_scope():
    # One valid token: L = {it}, it is both top and bottom by c -> low-cov weight 0.5.
    expect = -2.0 * E(0.5) + 0.5 * 0.1 * 0.5
    one = np.array([[0, 0, 1, 0, 0, 0]])
    for name in ("sent", "high_en"):
        loss, m = L.compute_policy_loss(name, LP6 * 0 - 1, LP6 * 0 - 1.5, A6 * 0 + 2, H6, one)
        close(loss, expect)
        close([m["n_valid"], m["penalized_frac"], m["selected_frac"], m["cov_max"]], [1, 1, 1, 0])


def test_high_en_hand_computed():
    v, _, _, m = run6("high_en")  # k_H = max(1, floor(0.2 * 5)) = 1 -> token 1 (H = 2.0), low-cov wins
    close(v[:5], [-R[0], -R[1] + 0.5 * 0.1 * 0.2, R[2], -1.0, R[4]])
    close([m["penalized_frac"], m["selected_frac"], m["cov_mean"], m["cov_max"]], [0.2, 0.2, 0, 0])


def test_grpo_hand_computed():
    lr = np.array([[0.5, 0.0, 0.5, 2.0, -0.5, -0.5]], np.float32)
    adv = np.array([[1, 1, -1, -1, -1, 1]], np.float32)
    lp = np.full((1, 6), -1.0, np.float32)
    old = lp - lr
    ent = np.ones((1, 6), np.float32)
    # t0 clipped at 1.2; t3 ratio e^2 = 7.39 hits the dual clip 3; t4 ratio 0.61 clipped at 0.8.
    expect = [-1.2, -1.0, E(0.5), 3.0, 0.8, -E(-0.5)]
    v, _, m = L.per_token_policy_loss("grpo", lp, old, adv, ent, np.ones((1, 6)))
    close(v[0], expect, 1e-5)
    close([m["clip_frac"], m["dual_clip_frac"], m["penalized_frac"]], [2 / 6, 1 / 6, 0])
    loss, _ = L.compute_policy_loss("grpo", lp, old, adv, ent, np.ones((1, 6)))
    close(loss, sum(expect) / 6, 1e-5)
    v, _, _ = L.per_token_policy_loss("grpo", lp, old, adv, ent, np.ones((1, 6)), clip_high=0.28)  # DAPO
    close(v[0, 0], -1.28, 1e-6)
    inf = float("inf")
    v, _, _ = L.per_token_policy_loss("grpo", lp, old, adv * np.array([1, 0, 1, 1, 1, 1]), ent, np.ones((1, 6)),
                                      dual_clip=inf)
    close(v[0, 3], E(2.0), 1e-5)
    assert v[0, 1] == 0.0
    g = jax.grad(lambda a: L.compute_policy_loss("grpo", lp, old, a, ent, np.ones((1, 6)), dual_clip=inf)[0])(
        jnp.asarray(adv * np.array([1, 0, 1, 1, 1, 1])))
    assert np.isfinite(g).all()


def test_kl_cov_hand_computed():
    v, _, _, m = run6("kl_cov")  # k = max(1, floor(0.002 * 5)) = 1 -> token 2 (cov 1.08), beta 1
    close(v[:5], [-R[0], -R[1], R[2] + 0.1, -1.0, R[4]])
    close([m["penalized_frac"], m["cov_mean"], m["cov_max"], m["clip_frac"]], [0.2, 1.6 / 5, 1.08, 0])
    # k = 3: tokens 2, 3 and the tie 0/1 (cov 0.08 both) broken by position -> 0.
    v, _, _, m = run6("kl_cov", kcov=0.6)
    close(v[:5], [-R[0] + 0.1, -R[1], R[2] + 0.1, -1.0, R[4]])
    close(m["penalized_frac"], 0.6)
    v, _, _, _ = run6("kl_cov_verl")  # k = 1, beta 0.1
    close(v[:5], [-R[0], -R[1], R[2] + 0.01, -1.0, R[4]])


def test_clip_cov_hand_computed():
    # PPO clip (0.2) clips t1; candidates with 0 < cov < 1 and not clipped: t0 (0.08), t3 (0.48).
    clip = {"clip_low": 0.2, "clip_high": 0.2}
    v, _, _, m = run6("clip_cov", ratio=0.4, cov_lb=0.0, cov_ub=1.0, **clip)  # k = 2: both zeroed
    close(v[:5], [0.0, -1.2, R[2], 0.0, R[4]])
    close([m["penalized_frac"], m["clip_frac"], m["cov_max"]], [0.4, 0.2, 1.08])
    seen = set()
    for seed in range(12):  # k = 1: one of the two candidates, at random
        v, _, m = L.per_token_policy_loss("clip_cov", LP6, OLD6, A6, H6, M6, rng=jax.random.key(seed),
                                          ratio=0.2, cov_lb=0.0, cov_ub=1.0, **clip)
        zeroed = tuple(i for i in (0, 3) if v[0, i] == 0)
        assert len(zeroed) == 1 and float(m["penalized_frac"]) == pytest.approx(0.2)
        seen.add(zeroed)
    assert seen == {(0,), (3,)}
    with pytest.raises(ValueError, match="rng"):
        L.compute_policy_loss("clip_cov", LP6, OLD6, A6, H6, M6)


def test_clip_cov_recipe_turns_the_ppo_clip_off():
    """Cui et al.'s recipe (the preset): clip ratio 1 / 1, so r is clipped to [0, 2] and none of the
    ratios 0.90 .. 1.35 is; t1 (0.08) is now a candidate too, and k = 3 zeroes t0, t1, t3."""
    assert {k: LOSSES["clip_cov"].preset[k] for k in ("clip_low", "clip_high")} == {"clip_low": 1.0, "clip_high": 1.0}
    v, _, _, m = run6("clip_cov", ratio=0.6, cov_lb=0.0, cov_ub=1.0)
    close(v[:5], [0.0, 0.0, R[2], 0.0, R[4]])
    close([m["penalized_frac"], m["clip_frac"]], [0.6, 0.0])
    v, _, _, m = run6("clip_cov", ratio=0.2, cov_lb=2.0, cov_ub=5.0)  # no candidate: plain -A r everywhere
    close(v[:5], [-R[0], -R[1], R[2], -1.0, R[4]])
    C.load_config(None, ["loss.name=grpo", "loss.params={clip_low: 1.0, clip_high: 1.0}"])  # accepted
    with pytest.raises(C.ConfigError, match=r"clip_low=1.2 must be in \[0, 1\]"):
        C.load_config(None, ["loss.name=clip_cov", "loss.params={clip_low: 1.2}"])


def test_entropy_bonus_hand_computed():
    v, _, _, _ = run6("entropy_bonus")
    grpo = np.array([-R[0], -1.2, R[2], -1.0, R[4]])
    close(v[:5], grpo - 0.001 * np.array([0.1, 2.0, 0.3, 0.2, 0.4]))


def test_entropy_adv_hand_computed():
    # A' = A + min(0.4 H, |A| / 2) = 1.04, 1.5, -0.88, 1.08, -0.84, then the GRPO term.
    v, _, _, m = run6("entropy_adv")
    close(v[:5], [-1.04 * R[0], -1.5 * 1.2, 0.88 * R[2], -1.08, 0.84 * R[4]], 1e-5)
    close(m["clip_frac"], 0.2)


def test_high_entropy_mask_hand_computed():
    v, agg, loss, m = run6("high_entropy_mask")  # ceil(0.2 * 5) = 1 -> token 1 only
    assert agg.tolist() == [False, True, False, False, False, False]
    close(loss, -1.2)
    close([m["selected_frac"], m["clip_frac"]], [0.2, 0.2])
    _, agg, loss, _ = run6("high_entropy_mask", top_frac=0.3)  # ceil(1.5) = 2 -> tokens 1, 4
    assert agg.tolist() == [False, True, False, False, True, False]
    close(loss, (-1.2 + R[4]) / 2)


def test_aggregate_hand_computed():
    v = np.array([[1.0, 2.0, 3.0, 0, 0], [4.0, 5.0, 6.0, 0, 0], [7.0, 8.0, 9.0, 0, 0]], np.float32)
    m = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # last row: padding, not in seq means
    close(L.aggregate(v, m, "token-mean"), 7 / 3)
    close(L.aggregate(v, m, "seq-mean-token-mean"), (1.5 + 4) / 2)
    close(L.aggregate(v, m, "seq-mean-token-sum"), (3 + 4) / 2)
    close(L.aggregate(v, m, "seq-mean-token-sum-norm"), (3 / 5 + 4 / 5) / 2)  # max_len defaults to T = 5
    close(L.aggregate(v, m, "seq-mean-token-sum-norm", max_len=10), (0.3 + 0.4) / 2)
    for mode in L.AGG_MODES:
        assert float(L.aggregate(v * np.nan, np.zeros((3, 5)), mode)) == 0.0


def test_kl_penalty_hand_computed():
    lp, ref = jnp.array([-1.0, -1.0, 0.0, -30.0]), jnp.array([-2.0, -1.0, -30.0, 0.0])
    close(L.kl_penalty(lp, ref, "k1"), [1.0, 0.0, 30.0, -30.0])
    close(L.kl_penalty(lp, ref, "k2"), [0.5, 0.0, 450.0, 450.0])
    # k3 with d = clamp(ref - logp, -20, 20): e^-1 - (-1) - 1 = e^-1; 0; e^-20 + 19 -> 10; huge -> 10.
    close(L.kl_penalty(lp, ref, "k3"), [E(-1.0), 0.0, 10.0, 10.0])


def test_floor_of_fraction_is_exact():
    n = jnp.int32(10000)
    assert int(L._floor_frac(L._as_fraction(0.0002), n)) == 2
    assert int(L._floor_frac(L._as_fraction(0.29), jnp.int32(1807931))) == 524299
    assert math.floor(np.float32(0.29) * np.float32(1807931)) == 524300  # why float32 is not used
    assert int(L._floor_frac(L._as_fraction(0.29), jnp.int32(100))) == 29 != int(0.29 * 100)  # nor float64
    assert int(L._floor_frac(L._as_fraction(0.2), jnp.int32(6), ceil=True)) == 2
    f = L._as_fraction(1 / 3)
    assert f.numerator * f.denominator < 2**31 and abs(float(f) - 1 / 3) < 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10**4), st.sampled_from([10, 100, 1000, 10**4, 10**5]), st.integers(0, 2**24))
def test_floor_frac_matches_python(num, den, n):
    frac = Fraction(min(num, den), den)
    x = float(frac)
    got = L._floor_frac(L._as_fraction(x), jnp.int32(n))
    assert int(got) == math.floor(Fraction(repr(x)) * n)
    got = L._floor_frac(L._as_fraction(x), jnp.int32(n), ceil=True)
    assert int(got) == math.ceil(Fraction(repr(x)) * n)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def _grad6(name, argnums, **hp):
    fn = lambda lp, old, adv, ent: L.compute_policy_loss(name, lp, old, adv, ent, M6, rng=KEY, **hp)[0]
    return [np.asarray(g)[0] for g in jax.grad(fn, argnums)(LP6, OLD6, A6, H6)]


def test_abs_has_zero_subgradient_at_zero():
    assert float(jax.grad(L._abs0)(0.0)) == 0.0
    assert float(jax.grad(L._abs0)(0.5)) == 1.0 and float(jax.grad(L._abs0)(-0.5)) == -1.0
    assert float(jax.grad(jnp.abs)(0.0)) == 1.0  # why _abs0 exists


def test_sent_gradient_matches_hand_derivation():
    # dL/dlogp_t = (1/n)(-A_t r_t + w_t beta sign(logp_t - old_t)); t3 has logp == old: sign 0.
    g_lp, g_h = _grad6("sent", (0, 3))
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5])
    expect = (-A6[0, :5] * R + w * 0.1 * np.sign(LR6)) / 5
    close(g_lp[:5], expect, 1e-5)
    assert g_lp[5] == 0.0 and g_lp[3] == pytest.approx(-1 / 5)
    np.testing.assert_array_equal(g_h, 0.0)


def test_on_policy_gradient_is_pure_policy_gradient():
    # First mini-batch: logp == old everywhere, so every |logp - old| term has zero gradient.
    fn = lambda lp: L.compute_policy_loss("sent", lp, LP6, A6, H6, M6)[0]
    g = np.asarray(jax.grad(fn)(jnp.asarray(LP6)))[0]
    close(g[:5], -A6[0, :5] / 5)
    assert g[5] == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_gradient_through_masked_tokens_or_ranking_entropy(name):
    g_lp, g_old, g_adv, g_h = _grad6(name, (0, 1, 2, 3))
    for g in (g_lp, g_old, g_adv, g_h):
        assert np.isfinite(g).all() and g[5] == 0.0  # the masked token holds NaN garbage
    if name == "entropy_bonus":
        close(g_h[:5], np.full(5, -0.001 / 5))
    else:
        np.testing.assert_array_equal(g_h, 0.0)
    assert np.abs(g_lp[:5]).sum() + np.abs(g_adv[:5]).sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_masked_gives_zero_loss_and_no_nan(name):
    z = np.full((2, 3), np.nan, np.float32)
    fn = lambda lp: L.compute_policy_loss(name, lp, z, z, z, np.zeros((2, 3)), rng=KEY)
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(z))
    assert float(loss) == 0.0 and all(float(x) == 0.0 for x in m.values())
    np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------
# The released code's integer-mask gather
# ---------------------------------------------------------------------------


def test_released_integer_mask_gather_scrambles_covariance_ranking():
    """`advantages[response_mask]` with an int mask is a row gather (B x T x T), not a selection."""
    adv = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    logp = np.array([[-0.1, -2.0, -0.5], [-1.0, -0.2, 0.0]])
    ent = np.array([[0.3, 0.1, 0.2], [0.4, 0.5, 9.0]])
    mask_int = np.array([[1, 1, 1], [1, 1, 0]])
    gathered = adv[mask_int]
    assert gathered.shape == (2, 3, 3)  # rows adv[0] / adv[1], picked by the mask values

    def released_ranking(adv_flat, logp_flat):
        flat_ent = ent[mask_int.astype(bool)]
        k = max(1, int(flat_ent.shape[0] * 0.8))
        low = np.argsort(flat_ent, kind="stable")[:k]
        a, lp = adv_flat[low], logp_flat[low]
        cov = (a - a.mean()) * (lp - lp.mean())
        return low[np.argmax(cov)], low[np.argmin(cov)]  # indices into the valid tokens

    bug = released_ranking(adv[mask_int].reshape(-1), logp[mask_int].reshape(-1))
    fixed = released_ranking(adv[mask_int.astype(bool)], logp[mask_int.astype(bool)])
    assert bug != fixed
    # entrl penalises exactly the boolean-mask ranking's high/low tokens (run on the example
    # padded to [4, 8], a shape the other tests already compiled; row-major token order is kept).
    pad = lambda x: np.pad(x, ((0, 2), (0, 5))).astype(np.float32)
    v, _, _ = L.per_token_policy_loss("sent_released", pad(logp), pad(logp - 0.1), pad(adv), pad(ent),
                                      pad(mask_int))
    v = np.asarray(v)[:2, :3]
    pg = -adv * E(0.1)
    valid_pos = np.argwhere(mask_int.astype(bool))
    penalised = {tuple(p) for p in np.argwhere(~np.isclose(v, pg, atol=1e-6) & (mask_int > 0))}
    assert penalised == {tuple(valid_pos[fixed[0]]), tuple(valid_pos[fixed[1]])}
    assert penalised != {tuple(valid_pos[bug[0]]), tuple(valid_pos[bug[1]])}


# ---------------------------------------------------------------------------
# Independent NumPy reference vs the jitted, vmapped JAX version
# ---------------------------------------------------------------------------

CONFIGS = [
    ("grpo", {}),
    ("grpo", {"clip_high": 0.28, "dual_clip": 1.5}),
    ("sent", {}),
    ("sent", {"rho": 0.5, "kcov": 0.25, "pg": "clip", "high_mult": 3.0}),
    ("sent_released", {"kcov": 0.3}),
    ("high_en", {"rho": 0.6, "kcov": 0.5}),
    ("kl_cov", {"kcov": 0.2}),
    ("kl_cov_verl", {}),
    ("clip_cov", {"ratio": 0.2, "cov_lb": -0.3, "cov_ub": 0.3, "clip_low": 0.2, "clip_high": 0.2}),
    ("clip_cov", {"ratio": 0.2, "cov_lb": -0.3, "cov_ub": 0.3}),  # the recipe's clip 1 / 1
    ("entropy_bonus", {"coef": 0.1}),
    ("entropy_adv", {}),
    ("high_entropy_mask", {"top_frac": 0.35}),
]
GRAD_CONFIGS = (2, 4, 5)  # indices of CONFIGS whose logp-gradient is checked against the formula


def _frac(x):
    return Fraction(repr(float(x)))


def np_smallest(key, member, k):
    idx = np.flatnonzero(member)
    order = idx[np.argsort(key[idx], kind="stable")]
    out = np.zeros(member.shape, bool)
    out[order[:k]] = True
    return out


def np_cov(adv, logp, s):
    """Covariance over the set s in float32 (same rounding as the tested code, so exact ties stay ties)."""
    c = np.zeros(adv.shape, np.float32)
    if s.any():
        n = np.float32(s.sum())
        ma = np.float32(adv[s].sum(dtype=np.float32)) / n
        ml = np.float32(logp[s].sum(dtype=np.float32)) / n
        c[s] = (adv[s] - ma) * (logp[s] - ml)
    return c


def np_loss(name, hp, logp, old, adv, ent, valid):
    """Reference of docs/method.md (SENT token loss, baselines) on flat arrays; returns per-token values and sets."""
    hp = {**LOSSES[name].preset, **hp}
    n = int(valid.sum())
    zero = lambda x: np.where(valid, x, 0).astype(np.float32)
    logp, old, adv, ent = zero(logp), zero(old), zero(adv), zero(ent)
    lr32 = logp - old
    lr, a, h = lr32.astype(np.float64), adv.astype(np.float64), ent.astype(np.float64)
    r = np.exp(np.clip(lr, -20, 20))
    none = np.zeros(valid.shape, bool)
    out = {"agg": valid.copy(), "penalized": none, "clipped": none, "dual": none, "selected": valid.copy(),
           "cov": np.zeros(valid.shape, np.float32), "cov_set": none}
    ref = Ref(hp, n, valid, logp, adv, lr, r, a, h, none)
    values = NP_REFERENCE[name](ref, out)
    out["values"] = np.where(out["agg"], values, 0.0)
    out["lr"], out["r"], out["a"] = lr, r, a
    return out


@dataclasses.dataclass
class Ref:
    """The inputs of one reference call: hyperparameters, n valid tokens, float32 arrays and float64 lr, r, A, H."""

    hp: dict
    n: int
    valid: np.ndarray
    logp: np.ndarray
    adv: np.ndarray
    lr: np.ndarray
    r: np.ndarray
    a: np.ndarray
    h: np.ndarray
    none: np.ndarray

    def ppo(self, a, dual=True):
        p1, p2 = -a * self.r, -a * np.clip(self.r, 1 - self.hp["clip_low"], 1 + self.hp["clip_high"])
        pc = np.maximum(p1, p2)
        if not dual:
            return pc, p2 > p1, self.none
        p3 = -a * self.hp["dual_clip"]
        return np.where(a < 0, np.minimum(pc, p3), pc), p2 > p1, (a < 0) & (pc > p3)


# One reference per registered loss: (inputs, out) -> per-token values, filling out's sets
# (test_numpy_reference_covers_every_loss keeps it complete).
def np_grpo(x, out):
    values, out["clipped"], out["dual"] = x.ppo(x.a)
    return values


def _np_sent_term(x, out, s):
    hp = x.hp
    c = np_cov(x.adv, x.logp, s)
    kc = max(1, math.floor(_frac(hp["kcov"]) * int(s.sum())))
    w = np.where(s, hp["base_mult"], 0.0)
    w[np_smallest(-c, s, kc)] = hp["high_mult"]
    w[np_smallest(c, s, kc)] = hp["low_mult"]
    if hp["pg"] == "clip":
        pg, out["clipped"], out["dual"] = x.ppo(x.a)
    else:
        pg = -x.a * x.r
    out.update(penalized=w * hp["beta"] > 0, cov=c, cov_set=s, selected=s, w=w)
    return pg + w * hp["beta"] * np.abs(x.lr)


def np_sent(x, out):
    return _np_sent_term(x, out, np_smallest(x.h, x.valid, max(1, math.floor(_frac(x.hp["rho"]) * x.n))))


def np_high_en(x, out):
    return _np_sent_term(x, out, np_smallest(-x.h, x.valid, max(1, math.floor((1 - _frac(x.hp["rho"])) * x.n))))


def np_kl_cov(x, out):
    c = np_cov(x.adv, x.logp, x.valid)
    top = np_smallest(-c, x.valid, max(1, math.floor(_frac(x.hp["kcov"]) * x.n)))
    out.update(penalized=top & (x.hp["beta"] > 0), cov=c, cov_set=x.valid)
    return -x.a * x.r + np.where(top, x.hp["beta"], 0.0) * np.abs(x.lr)


def np_clip_cov(x, out):
    """The deterministic part: the values before the random pick, the candidates and how many are picked."""
    values, clipped, _ = x.ppo(x.a, dual=False)
    c = np_cov(x.adv, x.logp, x.valid)
    out.update(clipped=clipped, cov=c, cov_set=x.valid,
               cand=x.valid & ~clipped & (c > x.hp["cov_lb"]) & (c < x.hp["cov_ub"]),
               k=max(1, math.floor(_frac(x.hp["ratio"]) * x.n)))
    return values


def np_entropy_bonus(x, out):
    pg, out["clipped"], out["dual"] = x.ppo(x.a)
    return pg - x.hp["coef"] * x.h


def np_entropy_adv(x, out):
    a2 = x.a + np.where(x.a != 0, np.minimum(x.hp["alpha"] * x.h, np.abs(x.a) / x.hp["kappa"]), 0.0)
    values, out["clipped"], out["dual"] = x.ppo(a2)
    return values


def np_high_entropy_mask(x, out):
    s = np_smallest(-x.h, x.valid, math.ceil(_frac(x.hp["top_frac"]) * x.n))
    values, clipped, dual = x.ppo(x.a)
    out.update(agg=s, selected=s, clipped=clipped & s, dual=dual & s)
    return values


NP_REFERENCE = {
    "grpo": np_grpo,
    "sent": np_sent,
    "sent_released": np_sent,
    "high_en": np_high_en,
    "kl_cov": np_kl_cov,
    "kl_cov_verl": np_kl_cov,
    "clip_cov": np_clip_cov,
    "entropy_bonus": np_entropy_bonus,
    "entropy_adv": np_entropy_adv,
    "high_entropy_mask": np_high_entropy_mask,
}


def test_numpy_reference_covers_every_loss():
    """A new loss needs its reference here and a case in CONFIGS; a removed one leaves nothing behind."""
    assert set(NP_REFERENCE) == set(LOSSES)
    assert {name for name, _ in CONFIGS} == set(LOSSES)


def np_metrics(ref, valid):
    n = int(valid.sum())
    frac = lambda m: (m & valid).sum() / n if n else 0.0
    cs = ref["cov_set"]
    return {"n_valid": n, "penalized_frac": frac(ref["penalized"]), "clip_frac": frac(ref["clipped"]),
            "dual_clip_frac": frac(ref["dual"]), "selected_frac": frac(ref["selected"]),
            "abs_logratio_mean": np.abs(ref["lr"])[valid].mean() if n else 0.0,
            "cov_mean": ref["cov"][cs].mean() if cs.any() else 0.0,
            "cov_max": ref["cov"][cs].max() if cs.any() else 0.0}


def make_cases(seed, k=24, b=4, t=8):
    """Random scopes: continuous, tie-heavy discrete, single valid token, padding rows, all masked."""
    rng = np.random.default_rng(seed)
    out = {x: np.zeros((k, b, t), np.float32) for x in ("logp", "old", "adv", "ent")}
    out["mask"] = np.zeros((k, b, t), bool)
    for i in range(k):
        kind = i % 4
        mask = rng.random((b, t)) < rng.uniform(0.3, 1.0)
        if kind == 1:  # ties everywhere; dyadic values keep float32 sums exact
            ent = rng.choice([0.0, 0.5, 1.0, 2.0], (b, t))
            logp = rng.choice([-0.25, -0.5, -1.0, -2.0], (b, t))
            lr = rng.choice([0.0, 0.125, -0.25, 0.5], (b, t))
            adv = np.repeat(rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], (b, 1)), t, 1)
        else:
            ent = rng.exponential(1.0, (b, t))
            logp = -rng.exponential(1.0, (b, t))
            lr = rng.normal(0, 0.3, (b, t)) * (rng.random((b, t)) > 0.2)
            adv = rng.normal(0, 1, (b, t)) if kind == 0 else np.repeat(rng.normal(0, 1, (b, 1)), t, 1)
        if kind == 2:  # scope of exactly one valid token
            mask[:] = False
            mask[rng.integers(b), rng.integers(t)] = True
        if kind == 3:
            mask[rng.integers(b)] = False  # a padding row
            if i % 8 == 3:
                mask[:] = False  # nothing valid at all
        logp32 = logp.astype(np.float32)
        garbage = np.where(mask, 0.0, np.nan if i % 2 else 1e4).astype(np.float32)
        out["logp"][i] = logp32 + garbage
        out["old"][i] = (logp32 - lr.astype(np.float32)) + garbage
        out["adv"][i] = adv + garbage
        out["ent"][i] = ent + garbage
        out["mask"][i] = mask
    return out


def _all_configs(logp, old, adv, ent, mask, key):
    res = []
    for i, (name, hp) in enumerate(CONFIGS):
        vals, agg, met = L.per_token_policy_loss(name, logp, old, adv, ent, mask, rng=key, **hp)
        loss, _ = L.compute_policy_loss(name, logp, old, adv, ent, mask, rng=key, agg="seq-mean-token-mean", **hp)
        g = None
        if i in GRAD_CONFIGS:
            g = jax.grad(lambda lp, name=name, hp=hp: L.compute_policy_loss(name, lp, old, adv, ent, mask, **hp)[0])(
                logp)
        res.append((vals, agg, met, loss, g))
    return res


@pytest.fixture(scope="module")
def batched():
    cases = make_cases(0)
    keys = jax.random.split(jax.random.key(1), cases["mask"].shape[0])
    fn = jax.jit(jax.vmap(_all_configs))
    out = fn(cases["logp"], cases["old"], cases["adv"], cases["ent"], cases["mask"], keys)
    return cases, keys, jax.tree.map(np.asarray, out)


def np_aggregate(values, mask, mode):
    rows = [(v[m], m.sum()) for v, m in zip(values, mask) if m.any()]
    if not rows:
        return 0.0
    if mode == "token-mean":
        return sum(v.sum() for v, _ in rows) / sum(c for _, c in rows)
    if mode == "seq-mean-token-mean":
        return np.mean([v.mean() for v, _ in rows])
    if mode == "seq-mean-token-sum":
        return np.mean([v.sum() for v, _ in rows])
    return np.mean([v.sum() / values.shape[1] for v, _ in rows])


def test_every_loss_matches_numpy_reference(batched):
    cases, _, out = batched
    k, b, t = cases["mask"].shape
    for c_idx, (name, hp) in enumerate(CONFIGS):
        vals, agg, met, loss, grad = out[c_idx]
        for i in range(k):
            valid = cases["mask"][i].reshape(-1)
            ref = np_loss(name, hp, *(cases[x][i].reshape(-1) for x in ("logp", "old", "adv", "ent")), valid)
            where = f"{name} {hp} case {i}"
            got_v = vals[i].reshape(-1)
            if name == "clip_cov":  # the random pick: a subset of the candidates, of the right size, zeroed
                diff = ~np.isclose(got_v, ref["values"], rtol=1e-5, atol=1e-5)
                assert ref["cand"][diff].all() and (got_v[diff] == 0).all(), where
                n_pick = round(float(met["penalized_frac"][i]) * valid.sum())
                assert n_pick == min(ref["k"], ref["cand"].sum()), where
                ref["values"] = np.where(diff, 0.0, ref["values"])
                ref["penalized"] = np.zeros_like(valid)
            np.testing.assert_allclose(got_v, ref["values"], rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_array_equal(agg[i].reshape(-1), ref["agg"], err_msg=where)
            ref_m = np_metrics(ref, valid)
            for key_, val in ref_m.items():
                if name == "clip_cov" and key_ == "penalized_frac":
                    continue
                np.testing.assert_allclose(met[key_][i], val, rtol=1e-5, atol=1e-5, err_msg=f"{where} {key_}")
            agg_ref = np_aggregate(ref["values"].reshape(b, t), ref["agg"].reshape(b, t), "seq-mean-token-mean")
            np.testing.assert_allclose(loss[i], agg_ref, rtol=1e-5, atol=1e-5, err_msg=where)
            if grad is not None:  # token-mean gradient: (1/n)(dpg/dlogp + w beta sign(lr))
                # (the sequence-mean loss above is not the one differentiated; token-mean is the default agg)
                n = max(valid.sum(), 1)
                hp_full = {**LOSSES[name].preset, **hp}
                if hp_full["pg"] == "clip":
                    continue
                g_ref = (-ref["a"] * ref["r"] * (np.abs(ref["lr"]) < 20)
                         + ref["w"] * hp_full["beta"] * np.sign(ref["lr"])) / n
                np.testing.assert_allclose(grad[i].reshape(-1), np.where(valid, g_ref, 0.0), rtol=1e-5, atol=1e-6,
                                           err_msg=where)


def test_jit_vmap_equals_eager_calls(batched):
    """Each vmapped, jitted result equals an eager, un-vmapped call on that scope alone."""
    cases, keys, out = batched
    for c_idx, (name, hp) in enumerate(CONFIGS):
        for i in (0, 1, 2, 3):
            args = [cases[x][i] for x in ("logp", "old", "adv", "ent", "mask")]
            vals, agg, met = L.per_token_policy_loss(name, *args, rng=keys[i], **hp)
            np.testing.assert_allclose(out[c_idx][0][i], vals, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(out[c_idx][1][i], agg)
            for k_, v_ in met.items():
                np.testing.assert_allclose(out[c_idx][2][k_][i], v_, rtol=1e-6, atol=1e-6)


def test_metric_keys_are_the_same_for_every_loss(batched):
    _, _, out = batched
    for res in out:
        assert set(res[2]) == set(L.METRIC_KEYS)
        assert all(v.dtype == np.float32 for v in res[2].values())


@jax.jit
def _agg_and_kl(v, m, lp, ref):
    return ([L.aggregate(v, m, mode) for mode in L.AGG_MODES], [L.kl_penalty(lp, ref, k) for k in L.KL_KINDS])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_aggregate_and_kl_match_numpy_jitted_and_eager(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    v = rng.normal(size=(3, 5)).astype(np.float32)
    m = rng.random((3, 5)) < data.draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    for mode in L.AGG_MODES:
        np.testing.assert_allclose(L.aggregate(v, m, mode), np_aggregate(v, m, mode), rtol=1e-5, atol=1e-6)
    lp, ref = (-rng.exponential(2.0, (3, 5))).astype(np.float32), (-rng.exponential(2.0, (3, 5))).astype(np.float32)
    d = np.clip(ref.astype(np.float64) - lp, -20, 20)
    expect = {"k1": lp - ref.astype(np.float64), "k2": 0.5 * (lp - ref.astype(np.float64)) ** 2,
              "k3": np.clip(np.exp(d) - d - 1, -10, 10)}
    for kind, e in expect.items():
        np.testing.assert_allclose(L.kl_penalty(lp, ref, kind), e, rtol=1e-5, atol=1e-6)
    aggs, kls = _agg_and_kl(v, m, lp, ref)
    for mode, got in zip(L.AGG_MODES, aggs):
        np.testing.assert_allclose(got, L.aggregate(v, m, mode), rtol=1e-6, atol=1e-7)
    for kind, got in zip(L.KL_KINDS, kls):
        np.testing.assert_allclose(got, L.kl_penalty(lp, ref, kind), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_inputs():
    ok = (LP6, OLD6, A6, H6, M6)
    with pytest.raises(ValueError, match="valid losses: grpo, sent"):
        L.compute_policy_loss("snet", *ok)
    with pytest.raises(ValueError, match="one shape"):
        L.compute_policy_loss("sent", LP6, OLD6[:, :5], A6, H6, M6)
    with pytest.raises(ValueError, match="one shape"):
        L.compute_policy_loss("grpo", LP6[0], OLD6[0], A6[0], H6[0], M6[0])
    with pytest.raises(ValueError, match="valid: rho, kcov, beta"):
        L.compute_policy_loss("sent", *ok, kcov_ratio=0.1)
    for name, bad in [("sent", {"rho": 0.0}), ("sent", {"rho": 1.5}), ("sent", {"beta": -0.1}),
                      ("grpo", {"clip_low": -0.1}), ("grpo", {"clip_high": -0.1}), ("grpo", {"dual_clip": 1.0}),
                      ("kl_cov", {"kcov": 0.0}), ("entropy_adv", {"kappa": 0.0}), ("sent", {"pg": "ppo"}),
                      ("clip_cov", {"cov_lb": 5.0}), ("sent", {"beta": True}), ("sent", {"beta": float("nan")}),
                      ("sent", {"beta": jnp.float32(0.1)}), ("high_entropy_mask", {"top_frac": 1.2}),
                      ("entropy_bonus", {"coef": -1.0}), ("sent", {"low_mult": -0.5})]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            L.compute_policy_loss(name, *ok, rng=KEY, **bad)
    with pytest.raises(ValueError, match="needs the token entropies"):
        L.compute_policy_loss("sent", LP6, OLD6, A6, None, M6)
    loss, _ = L.compute_policy_loss("grpo", LP6, OLD6, A6, None, M6)  # entropy unused: None is fine
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="unknown aggregation"):
        L.compute_policy_loss("grpo", *ok, agg="mean")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        L.kl_penalty(LP6, OLD6, "k4")
    with pytest.raises(ValueError, match="max_len"):
        L.aggregate(LP6, M6, "seq-mean-token-sum-norm", max_len=0)


def test_config_validates_losses_from_their_declarations():
    with pytest.raises(C.ConfigError, match="valid losses"):
        C.load_config(None, ["loss.name=sentt"])
    with pytest.raises(C.ConfigError, match="rho"):
        C.load_config(None, ["loss.name=sent", "loss.params={rho: 2.0}"])
    with pytest.raises(C.ConfigError, match="cov_lb=6.0 must be < cov_ub"):
        C.load_config(None, ["loss.name=clip_cov", "loss.params={cov_lb: 6.0}"])
    cfg = C.load_config(None, ["loss.name=kl_cov_verl", "loss.params={beta: 0.2}"])
    assert cfg.loss.params == {"beta": 0.2}
    with pytest.raises(ValueError, match="valid: clip_low, clip_high, dual_clip"):
        L.validate_loss_params("grpo", {"eps": 0.2})


def test_every_declared_loss_has_one_function():
    assert set(L._LOSS_FNS) == set(LOSSES)
    with pytest.raises(KeyError, match="no declaration"):
        L.loss_fn("not_declared")(lambda *a, **k: None)
    with pytest.raises(KeyError, match="two functions"):
        L.loss_fn("grpo")(lambda *a, **k: None)
