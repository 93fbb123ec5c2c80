"""Tests for entrl.sampling: strategies on raw logits, stop handling, and the model-driven sampler."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from entrl import sampling
from entrl.sampling import SamplingConfig, filter_logits, sample_next_token

# ----------------------------------------------------------------------------
# Strategies on raw logits
# ----------------------------------------------------------------------------
LOGITS_V = np.array([2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.8, -1.0], np.float32)


# Jitted once per setting: eager op-by-op dispatch is far slower on the shared CPU box.
_filter = jax.jit(filter_logits, static_argnames=("top_k", "top_p"))
_sample = jax.jit(sample_next_token, static_argnums=2)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_filter_logits_hand_computed():
    z = jnp.asarray(LOGITS_V)[None]
    np.testing.assert_array_equal(np.isfinite(_filter(z, top_k=3))[0], [1, 1, 0, 0, 1, 0, 0, 0])
    # top-p: probabilities sorted descending, keep until the mass before a token reaches p.
    p = _softmax(LOGITS_V)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    for top_p in (0.05, 0.5, 0.9, 0.999):
        keep = np.zeros(8, bool)
        keep[order[before < top_p]] = True
        np.testing.assert_array_equal(np.isfinite(_filter(z, top_p=top_p))[0], keep)
    # top-k then top-p on the renormalised top-k distribution.
    pk = _softmax(LOGITS_V[[0, 1, 4]])  # tokens 0, 1, 4 in descending order
    assert pk[0] < 0.6 < pk[0] + pk[1]
    np.testing.assert_array_equal(np.isfinite(_filter(z, top_k=3, top_p=0.6))[0], [1, 1, 0, 0, 0, 0, 0, 0])
    # Off, and k >= V, are no-ops.
    np.testing.assert_array_equal(_filter(z), z)
    np.testing.assert_array_equal(_filter(z, top_k=100), z)


def test_logprob_is_full_softmax_before_truncation_and_ban():
    cfg = SamplingConfig(temperature=0.7, top_k=2, top_p=0.9, banned_ids=(0,))
    z = jnp.tile(jnp.asarray(LOGITS_V)[None], (64, 1))
    tokens, logp = _sample(z, jax.random.key(0), cfg)
    full = np.log(_softmax(LOGITS_V / 0.7))
    np.testing.assert_allclose(logp, full[np.asarray(tokens)], rtol=0, atol=1e-6)
    assert set(np.asarray(tokens).tolist()) <= {1, 4}  # top-2 after banning token 0


def test_greedy_and_top1():
    z = jax.random.normal(jax.random.key(1), (16, 50))
    greedy, lp = _sample(z, jax.random.key(2), SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(greedy, np.argmax(z, -1))
    np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(z))[np.arange(16), greedy], atol=1e-6)
    top1, lp1 = _sample(z, jax.random.key(3), SamplingConfig(temperature=1.3, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_allclose(lp1, np.asarray(jax.nn.log_softmax(z / 1.3))[np.arange(16), greedy], atol=1e-6)
    # Greedy never picks a banned id, even the argmax.
    banned, _ = _sample(z, jax.random.key(2), SamplingConfig(temperature=0.0, banned_ids=tuple(range(25))))
    np.testing.assert_array_equal(banned, 25 + np.argmax(z[:, 25:], -1))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 0, 1.0), (0.8, 3, 1.0), (1.0, 0, 0.75), (1.2, 5, 0.8)],
)
def test_chi_square_distribution(temperature, top_k, top_p):
    """Sampled frequencies match softmax(z/T) and its top-k / top-p truncations."""
    n_draws = 40_000
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    z = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n_draws, LOGITS_V.size))
    tokens, _ = _sample(z, jax.random.key(1234), cfg)
    counts = np.bincount(np.asarray(tokens), minlength=LOGITS_V.size)
    # Expected distribution, computed independently in numpy.
    p = _softmax(LOGITS_V.astype(np.float64) / temperature)
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or p.size]] = True
    if top_p < 1.0:
        pk = np.where(keep, p, 0) / p[keep].sum()
        before = np.cumsum(pk[order]) - pk[order]
        keep[:] = False
        keep[order[before < top_p]] = True
    expected = np.where(keep, p, 0) / p[keep].sum()
    assert counts[~keep].sum() == 0, "a truncated token was sampled"
    chi2, pval = stats.chisquare(counts[keep], n_draws * expected[keep])
    assert pval > 1e-3, (counts, n_draws * expected, chi2)


def _record_state(rows: int, slot_rows, max_new: int):
    """A decode state of len(slot_rows) live slots (no model: the cache is empty)."""
    slots = len(slot_rows)
    return sampling._DecodeState(
        step=jnp.int32(0), tokens=jnp.zeros((rows, max_new), jnp.int32), logprobs=jnp.zeros((rows, max_new)),
        row=jnp.asarray(slot_rows, jnp.int32), pos=jnp.zeros(slots, jnp.int32), live=jnp.ones(slots, bool),
        last=jnp.zeros(slots, jnp.int32), prompt_len=jnp.ones(slots, jnp.int32),
        prompt_mask=jnp.ones((slots, 1), jnp.int32), cache=(), queue=jnp.zeros((1, rows), jnp.int32),
        next=jnp.zeros(1, jnp.int32), count=jnp.zeros(1, jnp.int32), rng=jax.random.key(0),
    )  # fmt: skip


@pytest.mark.parametrize("continuous", [False, True])
def test_record_stop_handling(continuous):
    """EOS is kept; a stopped row writes nothing more (PAD / log-prob 0 stay); a row stops at the length cap.

    One-shot: slot r is row r, every live row at column `step`. Continuous: slots hold rows in any
    order (here slot 0 holds row 2, slot 1 row 0), each written at its own row and column.
    """
    cfg = SamplingConfig(max_new_tokens=4, eos_ids=(7,), pad_id=0)
    slot_rows = [2, 0] if continuous else [0, 1]
    state = _record_state(3, slot_rows, 4)
    record = jax.jit(sampling._record, static_argnums=(3, 4, 5))
    for toks in ([5, 7], [9, 3], [9, 9], [7, 7]):  # one draw per call: [slot 0, slot 1]
        state = record(state, jnp.asarray(toks, jnp.int32), jnp.full(2, -0.5), cfg, None, continuous)
    out = np.zeros((3, 4), int)
    out[slot_rows] = [[5, 9, 9, 7], [7, 0, 0, 0]]
    np.testing.assert_array_equal(state.tokens, out)
    np.testing.assert_array_equal(state.pos, [4, 1])
    np.testing.assert_array_equal(state.live, [False, False])
    np.testing.assert_array_equal(np.asarray(state.logprobs)[slot_rows], [[-0.5] * 4, [-0.5, 0, 0, 0]])
    # Without the EOS, slot 0's row stops at the cap: live after 3 tokens, not after 4.
    state = _record_state(3, slot_rows, 4)
    for i in range(4):
        state = record(state, jnp.asarray([5, 7], jnp.int32), jnp.zeros(2), cfg, None, continuous)
        assert bool(state.live[0]) == (i < 3)


# ----------------------------------------------------------------------------
# Settings and prompt packing
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0), "n=0"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(cache_dtype="int8"), "cache_dtype"),
        (dict(eos_ids=[1]), "eos_ids"),
        (dict(slots=-1), "slots"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_config_normalises_and_hashes():
    a = SamplingConfig(temperature=1, eos_ids=(3, 2, 3), pad_id=2, banned_ids=(2, 5))
    b = SamplingConfig(temperature=1.0, eos_ids=(2, 3), pad_id=2, banned_ids=(5,))
    assert a == b and hash(a) == hash(b)
    assert a.banned_ids == (5,)  # PAD == EOS is not banned
    assert SamplingConfig(temperature=0).greedy and SamplingConfig(top_k=1).greedy
    assert SamplingConfig(temperature=0).logprob_temperature == 1.0
    with pytest.raises(ValueError, match="vocabulary"):
        SamplingConfig(eos_ids=(300,)).check_vocab(256)


def test_settings_from_a_tokenizer_ban_pad_and_bos_unless_they_stop():
    from types import SimpleNamespace

    from entrl.tokenizer import CharTokenizer

    char = CharTokenizer()  # PAD 0, BOS 1, EOS 2
    cfg = SamplingConfig.for_tokenizer(char, n=3, max_new_tokens=5)
    assert (cfg.n, cfg.max_new_tokens, cfg.eos_ids, cfg.pad_id, cfg.banned_ids) == (3, 5, (2,), 0, (0, 1))
    qwen = SimpleNamespace(stop_token_ids=[151643, 151645], pad_token_id=151643, bos_token_id=None)  # PAD = EOS
    cfg = SamplingConfig.for_tokenizer(qwen)
    assert (cfg.eos_ids, cfg.pad_id, cfg.banned_ids) == ((151643, 151645), 151643, ())


def test_pad_prompts_and_buckets():
    ids, mask = sampling.pad_prompts([[5, 6, 7], [8]], pad_id=0, buckets=(2, 4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert sampling.choose_bucket(64) == 64 and sampling.choose_bucket(65) == 128
    with pytest.raises(ValueError, match="largest bucket"):
        sampling.pad_prompts([[1] * 9], pad_id=0, buckets=(4, 8))
    with pytest.raises(ValueError, match="empty"):
        sampling.pad_prompts([[1, 2], []], pad_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        sampling.pad_prompts([], pad_id=0)
    with pytest.raises(ValueError, match="non-integer"):
        sampling.pad_prompts([[1.5, 2.0]], pad_id=0)
    with pytest.raises(ValueError, match="ascending"):
        sampling.pad_prompts([[1]], pad_id=0, buckets=(8, 4))


# ----------------------------------------------------------------------------
# With a model: a tiny random Qwen2-layout HF checkpoint saved by the test
# ----------------------------------------------------------------------------
VOCAB, PAD = 256, 255
PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [12, 13], [250, 1, 2, 3, 4], [77, 78, 79]]  # left-padded to 8
BUCKETS = (8, 16)
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF torch model, entrl model) with identical float32 weights."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Qwen2Config

    from entrl.models import load_pretrained

    hf_cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits: argmax is not decided by rounding
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg).eval()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    hf.save_pretrained(path)
    return hf, load_pretrained(path)


def _hf_greedy(hf, eos_id=None):
    import torch

    plen = BUCKETS[0]
    ids, mask = sampling.pad_prompts(PROMPTS, pad_id=PAD, buckets=(plen,))
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=eos_id,
        )  # fmt: skip
    resp = out[:, plen:].numpy()
    return np.pad(resp, ((0, 0), (0, MAX_NEW - resp.shape[1])), constant_values=PAD)


@pytest.fixture(scope="module")
def greedy_case(tiny):
    """HF greedy output with an early EOS (a token HF's greedy path emits 4th in row 0), and entrl's."""
    hf, model = tiny
    free = _hf_greedy(hf)
    assert PAD not in free  # else HF and the PAD ban would legitimately differ
    eos = int(free[0, 3])
    expected = _hf_greedy(hf, eos_id=eos)
    kw = dict(temperature=0.0, max_new_tokens=MAX_NEW, eos_ids=(eos,), pad_id=PAD, buckets=BUCKETS)
    return expected, eos, kw, sampling.generate(model, PROMPTS, **kw)


def test_greedy_matches_hf_generate(greedy_case):
    """Left-padded batch of different prompt lengths, early EOS in row 0."""
    expected, eos, _, ro = greedy_case
    np.testing.assert_array_equal(ro.tokens, expected)
    stops = [np.flatnonzero(r == eos) for r in expected]
    lengths = [int(s[0]) + 1 if s.size else MAX_NEW for s in stops]
    assert lengths[0] == 4 and MAX_NEW in lengths  # one early stop, one row that runs to the end
    np.testing.assert_array_equal(ro.lengths, lengths)
    np.testing.assert_array_equal(ro.mask, np.arange(MAX_NEW)[None] < np.asarray(lengths)[:, None])
    assert list(ro.finish_reason) == ["stop" if s.size else "length" for s in stops]


def test_top1_sampling_equals_greedy(tiny, greedy_case):
    _, model = tiny
    _, _, kw, greedy = greedy_case
    ro = sampling.generate(model, PROMPTS, **(kw | dict(temperature=1.3, top_k=1, seed=7)))
    np.testing.assert_array_equal(ro.tokens, greedy.tokens)
    np.testing.assert_array_equal(ro.mask, greedy.mask)


def test_bfloat16_cache_close_to_float32(tiny, greedy_case):
    """The optional bf16 KV cache: same greedy start, log-probs within bf16 rounding."""
    _, model = tiny
    _, _, kw, base = greedy_case
    ro = sampling.generate(model, PROMPTS, **(kw | dict(cache_dtype="bfloat16")))
    np.testing.assert_array_equal(ro.tokens[:, :3], base.tokens[:, :3])
    np.testing.assert_allclose(ro.logprobs[:, :3], base.logprobs[:, :3], atol=0.05)


STOCHASTIC = SamplingConfig(
    n=3, temperature=0.8, top_p=0.95, max_new_tokens=MAX_NEW, eos_ids=tuple(range(0, 40)), pad_id=PAD,
    banned_ids=(PAD,), segment_steps=3,
)  # fmt: skip  # EOS = ~15% of the vocabulary: most rows stop early, some at token 0, some run to the cap


@pytest.fixture(scope="module")
def stochastic(tiny):
    """(prompt ids, mask, one-shot Rollout) of `STOCHASTIC` on PROMPTS, seed 0."""
    _, model = tiny
    ids, mask = sampling.pad_prompts(PROMPTS, pad_id=PAD, buckets=BUCKETS)
    return ids, mask, sampling.Sampler(STOCHASTIC).sample(model, ids, mask, jax.random.key(0))


def test_sampled_logprobs_match_trainer_and_stop_masking(tiny, stochastic):
    """Sampler log-probs == token_stats on a full forward of prompt+response; stop/PAD invariants; seeds.

    Runs the trainer-level `Sampler` with 3 decode segments (the KV cache grows twice).
    """
    from flax import nnx

    from entrl.token_stats import token_logprobs_and_entropy

    _, model = tiny
    cfg, (ids, mask, ro) = STOCHASTIC, stochastic
    temp, n, eos = cfg.temperature, cfg.n, cfg.eos_ids
    assert len(sampling.decode_segments(BUCKETS[0], MAX_NEW, min_steps=3)) == 3
    sampler = sampling.Sampler(cfg)
    rows = len(PROMPTS) * n
    assert ro.tokens.shape == ro.mask.shape == ro.logprobs.shape == (rows, MAX_NEW)
    np.testing.assert_array_equal(ro.prompt_index, np.repeat(np.arange(len(PROMPTS)), n))
    np.testing.assert_array_equal(ro.prompt_ids[::n], ids)
    np.testing.assert_array_equal(ro.prompt_ids[1::n], ro.prompt_ids[::n])

    # Trainer recompute: full forward over prompt + response, logits at response positions.
    @nnx.jit
    def trainer_logp(model, prompt_ids, prompt_mask, tokens, mask):
        h = model.hidden(jnp.concatenate([prompt_ids, tokens], 1), jnp.concatenate([prompt_mask, mask], 1))
        plen = prompt_ids.shape[1]
        return token_logprobs_and_entropy(h[:, plen - 1 : -1], model.unembedding(), tokens, temperature=temp)[0]

    logp = trainer_logp(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    m = np.asarray(ro.mask, bool)
    np.testing.assert_allclose(np.asarray(ro.logprobs)[m], np.asarray(logp)[m], rtol=0, atol=1e-5)

    # Stop handling.
    tokens, lengths, reason = np.asarray(ro.tokens), np.asarray(ro.lengths), ro.finish_reason
    assert (reason == "stop").sum() >= rows // 2 and np.all(m.sum(1) == lengths)
    for r in range(rows):
        resp, L = tokens[r], lengths[r]
        assert not np.isin(resp[: L - 1], eos).any() and PAD not in resp[:L]
        assert reason[r] == ("stop" if resp[L - 1] in eos else "length")
        assert np.all(resp[L:] == PAD) and np.all(np.asarray(ro.logprobs)[r, L:] == 0)

    # Reproducible per seed, different across seeds, no recompilation for the same shapes.
    compiled = sampling._sample._cache_size()
    again = sampling.Sampler(cfg).sample(model, ids, mask, jax.random.key(0))
    other = sampler.sample(model, ids, mask, jax.random.key(1))
    assert sampling._sample._cache_size() == compiled
    np.testing.assert_array_equal(again.tokens, ro.tokens)
    np.testing.assert_array_equal(again.logprobs, ro.logprobs)
    assert not np.array_equal(other.tokens, ro.tokens)


def test_sharded_greedy_equals_unsharded(tiny, greedy_case):
    """2x2x2 (data, fsdp, tensor) mesh on 8 fake devices: 4 rows over 4 batch shards, heads over tensor."""
    from flax import nnx

    from entrl.sharding import make_mesh, shard_model

    _, model = tiny
    _, _, kw, base = greedy_case
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = nnx.clone(model)  # a copy: the fixture's model stays unsharded (merge(*split()) shares its Variables)
    shard_model(sharded, mesh)
    ro = sampling.generate(sharded, PROMPTS, mesh=mesh, **kw)
    assert len(ro.tokens.sharding.device_set) == 8 and not ro.tokens.sharding.is_fully_replicated
    np.testing.assert_array_equal(ro.tokens, base.tokens)
    np.testing.assert_allclose(ro.logprobs, base.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------
# Continuous batching: slots refilled as rows stop
# ----------------------------------------------------------------------------
def _finish_order(lengths, slots: int, shards: int = 1) -> list[int]:
    """Rows in the order the slot schedule finishes them (host simulation of `_refill`: per shard, free
    slots take that shard's next rows in order; a row of length 1 never takes a slot)."""
    rows = len(lengths)
    per_shard, per_slot = rows // shards, slots // shards
    events = []
    for d in range(shards):
        queue = [r for r in range(d * per_shard, (d + 1) * per_shard) if lengths[r] > 1]
        free_at = [1] * per_slot  # decode step at which each slot is free
        for r in queue:  # the earliest-free slot (ties: lowest slot) takes the next row
            k = min(range(per_slot), key=lambda j: (free_at[j], j))
            free_at[k] += lengths[r] - 1
            events.append((free_at[k], k, r))
    return [r for *_, r in sorted(events)]


@pytest.mark.parametrize("slots", [1, 5, 12, 17])
def test_slots_sample_the_same_responses_as_one_shot(tiny, stochastic, slots):
    """Fewer slots than rows (1: one row at a time; 5: not a multiple of n, rows finishing out of order),
    as many, and more: the same tokens, log-probs and finish reasons as the one-shot sampler for the
    same seed, and log-probs equal to the trainer's recompute (`entrl.token_stats.response_stats`)."""
    from entrl.token_stats import response_stats

    _, model = tiny
    ids, mask, base = stochastic
    rows = base.tokens.shape[0]
    lengths = np.asarray(base.lengths)
    # The case covers rows stopped by their first token (no slot), rows cut at the cap, and rows finishing
    # in another order than they started.
    assert (lengths == 1).any() and (lengths == MAX_NEW).any() and (base.finish_reason == "stop").any()
    order = _finish_order(lengths, slots) if slots < rows else []
    assert slots >= rows or slots == 1 or order != sorted(order), order
    compiled = sampling._sample._cache_size()
    ro = sampling.Sampler(dataclasses.replace(STOCHASTIC, slots=slots)).sample(model, ids, mask, jax.random.key(0))
    if slots >= rows:  # the one-shot program itself: no new compilation
        assert sampling._sample._cache_size() == compiled
    for field in ("tokens", "mask", "lengths", "finish_code", "prompt_ids", "prompt_mask", "prompt_index"):
        np.testing.assert_array_equal(getattr(ro, field), getattr(base, field), err_msg=field)
    np.testing.assert_allclose(ro.logprobs, base.logprobs, rtol=0, atol=1e-5)
    logp, _ = jax.jit(lambda m, a, b, c: response_stats(m, a, b, c, temperature=STOCHASTIC.temperature))(
        model, ro.prompt_ids, ro.prompt_mask, ro.tokens)
    m = np.asarray(ro.mask, bool)
    np.testing.assert_allclose(np.asarray(ro.logprobs)[m], np.asarray(logp)[m], rtol=0, atol=1e-5)


def _collective_groups(hlo: str, mesh) -> list[tuple[str, str, list[set[int]]]]:
    """(shape, op, device groups) of every collective of a compiled program's HLO text."""
    import re

    ids = np.vectorize(lambda d: d.id)(mesh.devices)  # [data, fsdp, tensor] device ids
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= (.+?) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                      r"(?:-start)?\(.*?(?:replica_groups|source_target_pairs)=(\{\{[\d,{}]*\}\}|mesh\[[^\]]*\] "
                      r"\{[^}]*\})", line)
        if not m:
            continue
        shape, op, groups = m.groups()
        if groups.startswith("mesh"):  # iota form: the named mesh axes are reduced over, the others kept
            axes = [int(a) for a in re.findall(r"'axis_(\d+)'", groups.split("{")[1])]
            moved = np.moveaxis(ids, axes, list(range(ids.ndim - len(axes), ids.ndim)))
            sets = [set(g.ravel().tolist()) for g in moved.reshape(-1, *moved.shape[ids.ndim - len(axes):])]
        else:
            sets = [set(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", groups)]
        out.append((shape, op, sets))
    return out


def test_slots_on_uniform_lengths_cut_the_cache_back_every_wave(tiny, monkeypatch):
    """No EOS: every row runs to the cap, so 6 slots take the 12 rows (4 prompts x 3) in two waves of 6,
    each with every row at position 1: the cache is cut back after each wave (two passes of the
    segments, counted at run time) and the tokens and log-probs are the one-shot sampler's."""
    _, model = tiny
    ids, mask = sampling.pad_prompts(PROMPTS, pad_id=PAD, buckets=BUCKETS)
    cfg = dataclasses.replace(STOCHASTIC, eos_ids=())  # a setting no other test compiles: traced here
    assert len(sampling.decode_segments(BUCKETS[0], MAX_NEW, min_steps=cfg.segment_steps)) == 3
    base = sampling.Sampler(cfg).sample(model, ids, mask, jax.random.key(1))
    assert np.all(np.asarray(base.lengths) == MAX_NEW)
    cuts, shrink = [], sampling._shrink_cache

    def counted(cache, slots, mesh):
        jax.debug.callback(lambda: cuts.append(slots))
        return shrink(cache, slots, mesh)

    monkeypatch.setattr(sampling, "_shrink_cache", counted)
    ro = sampling.Sampler(dataclasses.replace(cfg, slots=6)).sample(model, ids, mask, jax.random.key(1))
    jax.effects_barrier()
    assert len(cuts) == 2  # one pass per wave: without the cut, one pass would decode both waves
    np.testing.assert_array_equal(ro.tokens, base.tokens)
    np.testing.assert_allclose(ro.logprobs, base.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 1, 2), (2, 2, 2)])
def test_slots_on_a_mesh_keep_rows_on_their_shard(tiny, stochastic, shape):
    """4 data shards (data x fsdp), 1 slot each, heads over tensor: the same responses as the unsharded
    one-shot sampler. With params replicated over the data axis, the compiled program's collectives never
    span two data shards except for the loop conditions (scalars: any row live, the furthest live row's
    position): each shard refills its slots from its own rows."""
    from flax import nnx

    from entrl.sharding import batch_sharding, make_mesh, shard_model

    _, model = tiny
    ids, mask, base = stochastic
    mesh = make_mesh(*shape)
    sharded = nnx.clone(model)  # a copy: the fixture's model stays unsharded (merge(*split()) shares its Variables)
    shard_model(sharded, mesh)
    sampler = sampling.Sampler(dataclasses.replace(STOCHASTIC, slots=4), mesh=mesh)
    put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding(mesh, 2))  # noqa: E731
    ro = sampler.sample(sharded, put(ids), put(mask), jax.random.key(0))
    assert len(ro.tokens.sharding.device_set) == 8 and not ro.tokens.sharding.is_fully_replicated
    np.testing.assert_array_equal(ro.tokens, base.tokens)
    np.testing.assert_allclose(ro.logprobs, base.logprobs, rtol=0, atol=1e-5)
    if shape[1] > 1:
        return  # fsdp gathers the weights over the data shards: the collective check needs them replicated
    graphdef, params = nnx.split(sharded)
    hlo = sampler.lower(graphdef, params, put(ids), put(mask)).compile().as_text()
    ids_DxT = np.vectorize(lambda d: d.id)(mesh.devices).reshape(mesh.shape["data"] * mesh.shape["fsdp"], -1)
    shard_of = {int(i): d for d, row in enumerate(ids_DxT) for i in row}
    collectives = _collective_groups(hlo, mesh)
    assert collectives, "no collectives parsed: the HLO format changed?"
    for shape_, op, groups in collectives:
        if all(len({shard_of[i] for i in g}) == 1 for g in groups):
            continue  # within one data shard (the tensor axis)
        assert op == "all-reduce" and set(re.findall(r"(\w+)\[", shape_)) <= {"pred", "s32"} and "[]" in shape_, (
            shape_, op, groups)


def test_slots_that_do_not_split_over_the_shards_fail_before_compiling(tiny):
    from flax import nnx

    from entrl.sharding import make_mesh

    _, model = tiny
    graphdef, params = nnx.split(model)
    ids, mask = sampling.pad_prompts(PROMPTS, pad_id=PAD, buckets=BUCKETS)
    compiled = sampling._sample._cache_size()
    for shape, slots, match in [((2, 2, 2), 6, "slots=6"), ((8, 1, 1), 8, "4 prompts")]:
        sampler = sampling.Sampler(dataclasses.replace(STOCHASTIC, slots=slots), mesh=make_mesh(*shape))
        with pytest.raises(ValueError, match=match):
            sampler.sample((graphdef, params), ids, mask, jax.random.key(0))
        with pytest.raises(ValueError, match=match):
            sampler.lower(graphdef, params, ids, mask)
        with pytest.raises(ValueError, match=match):
            sampling.generate(model, PROMPTS, n=3, max_new_tokens=4, slots=slots, mesh=make_mesh(*shape))
    assert sampling._sample._cache_size() == compiled


def test_slot_kv_cache_is_sized_by_slots(tiny):
    """`Sampler.lower` compiles without running; the one-shot program holds every row's cache, the slot
    program S rows' (+ the prompts' own cache), as `kv_cache_bytes` counts."""
    from flax import nnx

    _, model = tiny
    graphdef, params = nnx.split(model)
    abstract = jax.ShapeDtypeStruct((len(PROMPTS), BUCKETS[0]), jnp.int32)
    mem, counted = {}, {}
    for slots in (0, 1):
        sampler = sampling.Sampler(dataclasses.replace(STOCHASTIC, slots=slots))
        mem[slots] = sampler.lower(graphdef, params, abstract, abstract).compile().memory_analysis().temp_size_in_bytes
        counted[slots] = sampler.kv_cache_bytes(model.cfg, len(PROMPTS), BUCKETS[0])
    rows = len(PROMPTS) * STOCHASTIC.n
    per_slot = 2 * 2 * 2 * 16 * 4  # k and v x 2 layers x 2 kv heads x head_dim 16 x float32
    assert counted[0] == dict(slots=rows * (BUCKETS[0] + MAX_NEW - 1) * per_slot,
                              prompts=len(PROMPTS) * BUCKETS[0] * per_slot,
                              total=rows * (BUCKETS[0] + MAX_NEW - 1) * per_slot)
    assert counted[1]["total"] == (BUCKETS[0] + MAX_NEW - 1) * per_slot + len(PROMPTS) * BUCKETS[0] * per_slot
    saved = counted[0]["total"] - counted[1]["total"]
    assert mem[0] - mem[1] >= 0.5 * saved, (mem, counted)


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([[1, 2], []], {}, "empty"),
        ([], {}, "non-empty"),
        ([[1] * 17], {}, "largest bucket"),
        ([[1, 2]], dict(n=0), "n=0"),
        ([[1, 2]], dict(top_p=0.0), "top_p"),
        ([[1, 2]], dict(top_p=1.01), "top_p"),
        ([[1, 2]], dict(temperature=-1.0), "temperature"),
        ([[1, 2]], dict(top_k=-2), "top_k"),
        ([[1, VOCAB]], {}, "vocabulary"),
        ([[1, 2]], dict(eos_ids=(VOCAB + 3,)), "vocabulary"),
    ],
)
def test_generate_bad_input(tiny, prompts, kwargs, match):
    _, model = tiny
    with pytest.raises(ValueError, match=match):
        sampling.generate(model, prompts, **(dict(max_new_tokens=4, eos_ids=(), buckets=BUCKETS) | kwargs))


@pytest.mark.parametrize("plen,max_new,min_steps", [(64, 128, 32), (8, 12, 3), (512, 2048, 32), (8, 1, 32), (8, 2, 1)])
def test_decode_segments_cover_every_step(plen, max_new, min_steps):
    segs = sampling.decode_segments(plen, max_new, min_steps=min_steps)
    ends = [e for e, _ in segs]
    assert ends == sorted(ends) and ends[-1] == max_new and 1 <= len(segs) <= 4
    for end, slots in segs:  # steps before `end` write slots up to plen + end - 2 and read them all
        assert slots == plen + end - 1 and slots <= plen + max_new
