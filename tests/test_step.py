"""The pure update step (entrl.rl.step) on a tiny model, single device.

- global-scope gradient accumulation: 4 micro-batches give the gradient (and the
  parameters after an update) of the one-shot loss on the whole mini-batch;
- micro-batch scope: the loss is the mean of `compute_policy_loss` per micro-batch;
- a non-finite loss leaves params and optimizer state bitwise unchanged;
- `response_stats` equals log_softmax(model(sequence) / T) at the response tokens;
- the jitted update compiles once for repeated calls of the same shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from entrl import token_stats as TS
from entrl.models import ModelConfig, create_model
from entrl.rl import losses as L
from entrl.rl import step as S

V, N, P, LEN, T = 41, 8, 7, 6, 0.8  # vocab, rows, prompt width, response length, temperature
CFG = ModelConfig(arch="qwen2", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16, qkv_bias=True, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    g, p = nnx.split(create_model(CFG, seed=3))
    return g, p


@pytest.fixture(scope="module")
def batch(model):
    """A mini-batch of N rows with left-padded prompts, ragged responses and non-trivial old/ref log-probs."""
    g, p = model
    rng = np.random.default_rng(0)
    prompt_len = rng.integers(2, P + 1, N)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    prompt_ids = np.where(prompt_mask, rng.integers(1, V, (N, P)), 0).astype(np.int32)
    resp_len = rng.integers(1, LEN + 1, N)
    resp_mask = (np.arange(LEN)[None] < resp_len[:, None]).astype(np.float32)
    resp_ids = np.where(resp_mask > 0, rng.integers(1, V, (N, LEN)), 0).astype(np.int32)
    logp, _ = TS.compute_logprobs(g, p, {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "resp_ids": resp_ids},
                                 temperature=T, num_micro=1, chunk_size=1024)
    logp = np.asarray(logp)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "resp_ids": resp_ids, "resp_mask": resp_mask,
        "old_logp": (logp + 0.05 * rng.standard_normal(logp.shape)).astype(np.float32),
        "ref_logp": (logp + 0.3 * rng.standard_normal(logp.shape)).astype(np.float32),
        "advantages": rng.standard_normal(N).astype(np.float32),
    }


def _settings(**kw):
    base = dict(loss_name="sent", temperature=T, kl_coef=0.01, loss_params=(("kcov", 0.2),))
    return S.StepSettings(**{**base, **kw})


# Two optimizers shared by every test, so each (optimizer, settings) pair compiles once per session:
# SGD(1) turns an update into `params - grads`; Adam with an injected learning rate lets a test
# raise the learning rate without recompiling.
SGD = optax.sgd(1.0)
ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
_FNS = {}


def _update_fn(g, opt, settings):
    key = (id(opt), settings)
    if key not in _FNS:
        _FNS[key] = S.make_update_fn(g, opt, settings)
    return _FNS[key]


def _sgd_grads(model, batch, settings, rng):
    """(loss, metrics, grads) of one update, read off an SGD(1) step."""
    g, p = model
    params = jax.tree.map(jnp.copy, p)  # the update donates its inputs
    new_p, _, m = _update_fn(g, SGD, settings)(params, SGD.init(params), batch, rng)
    assert float(m["skipped_nonfinite"]) == 0
    return float(m["loss"]), m, jax.tree.map(jnp.subtract, p, new_p)


def _tree_max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tree_max(a):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


@pytest.mark.parametrize("num_micro,shards", [(4, 1), (2, 2)])
def test_global_scope_microbatching_equals_one_shot(model, batch, num_micro, shards):
    """The splice trick: 4 micro-batches (4 x 2 rows, or 2 x 2 shards x 2 rows) give the one-shot update."""
    rng = jax.random.key(0)
    loss1, m1, g1 = _sgd_grads(model, batch, _settings(num_micro=1), rng)
    loss4, m4, g4 = _sgd_grads(model, batch, _settings(num_micro=num_micro, shards=shards), rng)
    assert abs(loss1 - loss4) < 1e-6
    assert float(m1["penalized_frac"]) > 0  # the SENT term is active, so the test has teeth
    for k in ("penalized_frac", "selected_frac", "cov_max", "ref_kl", "policy_entropy"):
        np.testing.assert_allclose(float(m1[k]), float(m4[k]), atol=1e-6, err_msg=k)
    assert _tree_max(g1) > 1e-3
    assert _tree_max_diff(g1, g4) < 1e-5  # = the parameters after the SGD update
    # ... while micro-batch scope (each 2-row micro-batch its own scope) is a different objective.
    _, _, gm = _sgd_grads(model, batch, _settings(num_micro=num_micro, shards=shards, scope="microbatch"), rng)
    assert _tree_max_diff(g1, gm) > 1e-4


@pytest.mark.parametrize("num_micro,shards,sort", [(4, 1, False), (2, 2, True)])
def test_length_trimmed_microbatches_equal_one_shot(model, batch, num_micro, shards, sort):
    """Micro-batches run only up to their length bucket (3 buckets: 2, 4, 6 of the 6 response columns),
    optionally after sorting each shard's rows by length: the update equals the untrimmed one-shot update.
    Understating the lengths (trimming real tokens away) changes it, so the trimming is really applied."""
    rng = jax.random.key(0)
    resp_len = batch["resp_mask"].sum(1).astype(np.int32)
    loss1, m1, g1 = _sgd_grads(model, batch, _settings(num_micro=1), rng)
    mb = dict(batch, resp_len=resp_len)
    if sort:  # rows move only inside their shard: a permutation of the mini-batch, whose loss is order-free
        order = S.length_order(resp_len, shards, 1)
        assert sorted(order[: N // 2]) == list(range(N // 2)) and list(order) != list(range(N))
        mb = {k: v[order] for k, v in mb.items()}
    trimmed = _settings(num_micro=num_micro, shards=shards, length_buckets=3)
    buckets = S.response_buckets(LEN, 3)
    assert buckets == (2, 4, 6)
    micro_longest = np.asarray(TS.micro_rows(jnp.asarray(mb["resp_len"]), num_micro, shards)).max(1)
    assert min(micro_longest) <= 4  # some micro-batch runs on a shorter branch
    loss_t, m_t, g_t = _sgd_grads(model, mb, trimmed, rng)
    assert abs(loss1 - loss_t) < 1e-6
    for k in ("penalized_frac", "selected_frac", "cov_max", "ref_kl", "policy_entropy"):
        np.testing.assert_allclose(float(m1[k]), float(m_t[k]), atol=1e-6, err_msg=k)
    assert _tree_max_diff(g1, g_t) < 1e-5
    short = dict(mb, resp_len=np.minimum(mb["resp_len"], 2))  # every micro-batch on the 2-column branch
    loss_s, _, g_s = _sgd_grads(model, short, trimmed, rng)
    assert abs(loss1 - loss_s) > 1e-4 or _tree_max_diff(g1, g_s) > 1e-4


def test_trimmed_logprobs_equal_full_and_bucket_choice(model, batch):
    g, p = model
    full = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "resp_ids")}
    resp_len = batch["resp_mask"].sum(1).astype(np.int32)
    want = TS.compute_logprobs(g, p, full, temperature=T, num_micro=4, chunk_size=1024)
    got = TS.compute_logprobs(g, p, dict(full, resp_len=resp_len), temperature=T, num_micro=4, chunk_size=1024,
                             length_buckets=3)
    m = batch["resp_mask"] > 0
    # Micro-batch i = rows 2i, 2i+1, run on the smallest of (2, 4, 6) columns holding its longer row:
    # past that, the trimmed arrays are 0 (padding), the full ones are not.
    bucket_N = np.repeat([min(b for b in (2, 4, 6) if b >= mx) for mx in resp_len.reshape(4, 2).max(1)], 2)
    cut = np.arange(LEN)[None] >= bucket_N[:, None]
    assert cut.any()
    for w, x in zip(want, got):
        np.testing.assert_allclose(np.asarray(x)[m], np.asarray(w)[m], atol=1e-6)
        assert np.all(np.asarray(x)[cut] == 0) and np.all(np.asarray(w)[cut] != 0)
    assert S.response_buckets(2048, 4) == (512, 1024, 1536, 2048) and S.response_buckets(5, 8) == (1, 2, 3, 4, 5)
    idx = [int(S.bucket_index(jnp.asarray(x), (2, 4, 6))) for x in ([1, 2], [3, 1], [4, 4], [5, 0], [6, 6])]
    assert idx == [0, 1, 1, 2, 2]


def test_length_order_sorts_within_each_shard_block():
    lengths = np.array([5, 1, 4, 2, 9, 3, 3, 0])  # 2 shards x 2 blocks of 2 rows
    order = S.length_order(lengths, shards=2, blocks=2)
    np.testing.assert_array_equal(order, [1, 0, 3, 2, 5, 4, 7, 6])
    np.testing.assert_array_equal(S.length_order(lengths, shards=1, blocks=1), np.argsort(lengths, kind="stable"))


def test_micro_rows_take_every_shards_block():
    x = np.arange(12)  # 3 shards of 4 rows, 2 micro-batches of 2 rows per shard
    micro = np.asarray(TS.micro_rows(jnp.asarray(x), 2, 3))
    np.testing.assert_array_equal(micro, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]])
    np.testing.assert_array_equal(np.asarray(TS.from_micro_rows(jnp.asarray(micro), 3)), x)


@pytest.mark.parametrize("shards", [1, 2])
def test_microbatch_scope_is_mean_of_per_microbatch_losses(model, batch, shards):
    """The released scope: every shard's micro-batch (2 rows here) is its own selection scope."""
    g, p = model
    rng = jax.random.key(1)
    n_micro = 4 // shards
    m, local = N // (n_micro * shards), N // shards  # rows per (shard, micro-batch), rows per shard
    s = _settings(num_micro=n_micro, shards=shards, scope="microbatch")
    loss, metrics, _ = _sgd_grads(model, batch, s, rng)

    @jax.jit
    def direct(params):
        mdl = nnx.merge(g, params)
        losses, pen = [], []
        for i, sh in [(i, sh) for i in range(n_micro) for sh in range(shards)]:
            rows = slice(sh * local + i * m, sh * local + (i + 1) * m)
            mb = {k: jnp.asarray(v[rows]) for k, v in batch.items()}
            logp, ent = TS.response_stats(mdl, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"], temperature=T)
            adv = jnp.broadcast_to(mb["advantages"][:, None], logp.shape)
            pg, lm = L.compute_policy_loss("sent", logp, mb["old_logp"], adv, ent, mb["resp_mask"],
                                           rng=None, agg="token-mean", max_len=LEN, kcov=0.2)
            kl = L.aggregate(L.kl_penalty(logp, mb["ref_logp"], "k3"), mb["resp_mask"], "token-mean", max_len=LEN)
            losses.append(pg + s.kl_coef * kl)
            pen.append(lm["penalized_frac"])
        return jnp.mean(jnp.stack(losses)), jnp.mean(jnp.stack(pen))

    want, want_pen = direct(p)
    np.testing.assert_allclose(loss, float(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["penalized_frac"]), float(want_pen), atol=1e-6)


@pytest.mark.parametrize("shards,micro_rows_per_shard", [(1, 1), (1, 2), (1, 8), (2, 1), (2, 4)])
def test_microbatch_scope_does_not_depend_on_the_memory_microbatch(model, batch, shards, micro_rows_per_shard):
    """Scopes of q = 2 consecutive rows per shard (`scope_seqs`, the release's 4-sequence micro-batch in
    small) give the same loss, selection and gradients whether a micro-batch holds 1 (each scope spread
    over 2 micro-batches, spliced), 2, or 4-8 rows per shard (several scopes per micro-batch); clip_cov's
    random draw too. Reference: each scope computed on its own."""
    g, p = model
    rng, q = jax.random.key(2), 2
    n_micro = N // (shards * micro_rows_per_shard)
    local = N // shards

    @jax.jit
    def direct(params):
        mdl = nnx.merge(g, params)
        losses, pen = [], []
        for sh in range(shards):
            for m in range(local // q):
                mb = {k: jnp.asarray(v[sh * local + m * q: sh * local + (m + 1) * q]) for k, v in batch.items()}
                logp, ent = TS.response_stats(mdl, mb["prompt_ids"], mb["prompt_mask"], mb["resp_ids"], temperature=T)
                adv = jnp.broadcast_to(mb["advantages"][:, None], logp.shape)
                pg, lm = L.compute_policy_loss("sent", logp, mb["old_logp"], adv, ent, mb["resp_mask"], rng=None,
                                               agg="token-mean", max_len=LEN, kcov=0.2)
                kl = L.aggregate(L.kl_penalty(logp, mb["ref_logp"], "k3"), mb["resp_mask"], "token-mean", max_len=LEN)
                losses.append(pg + 0.01 * kl)
                pen.append(lm["penalized_frac"])
        return jnp.mean(jnp.stack(losses)), jnp.mean(jnp.stack(pen))

    (want, want_pen), want_g = jax.value_and_grad(direct, has_aux=True)(p)
    loss, metrics, grads = _sgd_grads(model, batch, _settings(num_micro=n_micro, shards=shards, scope="microbatch",
                                                             scope_seqs=q), rng)
    np.testing.assert_allclose(loss, float(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["penalized_frac"]), float(want_pen), atol=1e-6)
    assert _tree_max(want_g) > 1e-3 and _tree_max_diff(grads, want_g) < 1e-5

    # clip_cov draws tokens at random in each scope: the draw belongs to the scope, not to the micro-batch.
    clip = dict(loss_name="clip_cov", loss_params=(("cov_lb", -np.inf), ("ratio", 0.5)), scope="microbatch",
                scope_seqs=q, shards=shards)
    got = _sgd_grads(model, batch, _settings(num_micro=n_micro, **clip), rng)
    ref = _sgd_grads(model, batch, _settings(num_micro=N // (shards * q), **clip), rng)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-7)
    assert _tree_max_diff(got[2], ref[2]) < 1e-5
    other = _sgd_grads(model, batch, _settings(num_micro=n_micro, **clip), jax.random.key(3))
    assert _tree_max_diff(other[2], ref[2]) > 1e-4  # another draw: the comparison has teeth


@pytest.mark.parametrize("poison", ["nan_old_logp", "huge_lr"])
def test_nonfinite_step_leaves_state_bitwise_unchanged(model, batch, poison):
    g, p = model
    fn = _update_fn(g, ADAM, _settings(num_micro=2))
    params = jax.tree.map(jnp.copy, p)
    opt_state = ADAM.init(params)
    mb = dict(batch)
    if poison == "nan_old_logp":
        old = mb["old_logp"].copy()
        assert mb["resp_mask"][3, 0] == 1  # (3, 0) is a valid token
        old[3, 0] = np.nan
        mb["old_logp"] = old
    else:  # a huge learning rate: the first update is finite, but the next forward overflows
        opt_state.hyperparams["learning_rate"] = jnp.asarray(1e30, jnp.float32)
        params, opt_state, m = fn(params, opt_state, mb, jax.random.key(0))
        assert float(m["skipped_nonfinite"]) == 0
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    before = jax.tree.map(np.asarray, (params, opt_state))
    new_params, new_opt, metrics = fn(params, opt_state, mb, jax.random.key(0))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    after = jax.tree.map(np.asarray, (new_params, new_opt))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_response_stats_equals_full_forward_log_softmax(model, batch):
    g, p = model
    mdl = nnx.merge(g, p)
    logp, ent = jax.jit(lambda m, a, b, c: TS.response_stats(m, a, b, c, temperature=T, chunk_size=16))(
        mdl, batch["prompt_ids"], batch["prompt_mask"], batch["resp_ids"])
    seq = np.concatenate([batch["prompt_ids"], batch["resp_ids"]], 1)
    mask = np.concatenate([batch["prompt_mask"], np.ones_like(batch["resp_ids"])], 1)
    logits = np.asarray(mdl(jnp.asarray(seq), jnp.asarray(mask)), np.float64) / T
    logits = logits[:, P - 1:-1]  # the positions that predict the response tokens
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lsm = logits - logz[..., None]
    want = np.take_along_axis(lsm, batch["resp_ids"][..., None], -1)[..., 0]
    want_ent = -(np.exp(lsm) * lsm).sum(-1)
    np.testing.assert_allclose(np.asarray(logp), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, atol=2e-5)


def test_update_compiles_once_for_repeated_shapes(model, batch):
    g, p = model
    fn = S.make_update_fn(g, ADAM, _settings(num_micro=2))  # a fresh jit (same program: persistent cache)
    params = jax.tree.map(jnp.copy, p)
    state = ADAM.init(params)
    for i in range(3):  # outputs (donated) feed the next call, as in the trainer
        mb = dict(batch, advantages=batch["advantages"] * (i + 1))
        params, state, m = fn(params, state, mb, jax.random.key(i))
        assert float(m["skipped_nonfinite"]) == 0
    assert fn.jitted._cache_size() == 1


def test_balanced_shard_order_deals_equal_sets_of_about_equal_length():
    """verl's balance_batch partitioner (Karmarkar-Karp, equal sizes), checked on hand-worked cases and,
    in a one-off scratch run against verl's seqlen_balancing.py, equal on 3,000 random cases."""
    from entrl.rl.step import balanced_shard_order

    lengths = np.random.default_rng(0).geometric(1 / 300, 2048).clip(1, 2048)
    for shards in (1, 2, 8, 256):
        order = balanced_shard_order(lengths, shards)
        assert sorted(order) == list(range(2048))
        sets = order.reshape(shards, -1)
        assert all(list(s) == sorted(s) for s in sets)  # each shard's rows in rollout order
        totals = lengths[sets].sum(1)
        assert list(totals) == sorted(totals, reverse=True)  # the heaviest set to shard 0, as verl's rank 0
        assert totals.max() - totals.min() <= lengths.max()
    assert list(balanced_shard_order(lengths, 1)) == list(range(2048))  # one shard: as rolled out
    contiguous = lengths.reshape(8, -1).sum(1)
    balanced = lengths[balanced_shard_order(lengths, 8).reshape(8, -1)].sum(1)
    assert np.ptp(balanced) <= 1 < np.ptp(contiguous)  # 77,352 or 77,353 tokens a shard
    # By hand: sorted (length, row) = (1,1) (1,2) | (5,0) (5,3) -> partials {1}{1} and {5}{5}, both of spread 0:
    # the heavier pops first; its sets (ties by items: row 3's first) take the other's lightest, i.e.
    # {3, 1} and {0, 2}, 6 and 6, the first-sorted set to shard 0.
    assert list(balanced_shard_order([5, 1, 1, 5], 2)) == [1, 3, 0, 2]
    # (2,3) (3,1) (6,5) | (7,2) (8,4) (10,0): spreads 4 and 3; {6}+{7}, {3}+{8}, {2}+{10} = 13, 11, 12.
    assert list(balanced_shard_order([10, 3, 7, 2, 8, 6], 3)) == [2, 5, 0, 3, 1, 4]
    with pytest.raises(ValueError, match="5 rows do not deal to 2 equal sets"):
        balanced_shard_order([1, 2, 3, 4, 5], 2)
