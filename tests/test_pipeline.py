"""entrl.data.pipeline: curriculum-ordered, sharded, fixed-shape batches and exact resume."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from entrl.data.curriculum import Curriculum
from entrl.data.pipeline import PromptPipeline
from entrl.data.sources import load_records
from entrl.data.tasks import ArithmeticTask, tokenize_prompts
from entrl.tokenizer import CharTokenizer

PAD = 0
BUCKETS = (4, 8, 16)


def _prompts(n, seed=0):
    """n prompts of length 1..12; token value = row index + 1 so rows are recognisable."""
    lens = np.random.default_rng(seed).integers(1, 13, size=n)
    return [[i + 1] * int(k) for i, k in enumerate(lens)]


def _pipe(tokens, cur, **kw):
    kw.setdefault("batch_size", 4)
    return PromptPipeline(tokens, cur, pad_id=PAD, buckets=BUCKETS, **kw)


def _key(batch):
    return (batch.stage, batch.epoch, batch.step_in_epoch, batch.indices.tolist(), batch.input_ids.tolist())


def test_batches_fixed_shape_left_padded():
    tokens = _prompts(40)
    cur = Curriculum(np.arange(40.0), stages=2, epochs_per_stage=2)
    batches = list(_pipe(tokens, cur))
    assert len(batches) == 2 * 2 * 5
    for b in batches:
        assert b.input_ids.shape == b.attention_mask.shape and b.input_ids.shape[0] == 4
        assert b.input_ids.dtype == np.int32 and b.valid.all()
        width = b.input_ids.shape[1]
        longest = max(len(tokens[i]) for i in b.indices)
        assert width == min(w for w in BUCKETS if w >= longest)  # smallest fitting bucket
        for row, i in enumerate(b.indices):
            t = tokens[i]
            assert b.input_ids[row, width - len(t):].tolist() == t  # left-padded
            assert (b.input_ids[row, : width - len(t)] == PAD).all()
            assert b.attention_mask[row].tolist() == [0] * (width - len(t)) + [1] * len(t)
    assert [b.step for b in batches] == list(range(20))
    assert [b.first_in_stage for b in batches].count(True) == 2 and batches[10].first_in_stage
    assert batches[9].last_in_stage and batches[-1].last_in_stage


def test_curriculum_order_stages_and_shuffles():
    se = np.random.default_rng(0).random(48)
    tokens = _prompts(48)
    cur = Curriculum(se, stages=2, epochs_per_stage=3, seed=5)
    batches = list(_pipe(tokens, cur))
    assert [(b.stage, b.epoch) for b in batches] == [(s, e) for s in range(2) for e in range(3) for _ in range(6)]
    low = set(cur.stage_indices(0).tolist())
    for b in batches:
        assert set(b.indices.tolist()) <= low if b.stage == 0 else not set(b.indices.tolist()) & low
    # Each epoch visits the stage in that epoch's shuffle; epochs differ; same seed -> same stream.
    epochs = {}
    for b in batches:
        epochs.setdefault((b.stage, b.epoch), []).extend(b.indices.tolist())
    for (s, e), idx in epochs.items():
        assert idx == cur.epoch_order(s, e).tolist()
    assert epochs[(0, 0)] != epochs[(0, 1)]
    again = list(_pipe(tokens, Curriculum(se, stages=2, epochs_per_stage=3, seed=5)))
    assert [_key(b) for b in again] == [_key(b) for b in batches]
    other = list(_pipe(tokens, Curriculum(se, stages=2, epochs_per_stage=3, seed=6)))
    assert [_key(b) for b in other] != [_key(b) for b in batches]


@pytest.mark.parametrize("cut", [3, 7, 8, 9, 15])
def test_restore_mid_stage_and_across_boundary(cut):
    # 2 stages x 2 epochs x 4 steps; cut 8 is exactly the stage boundary, 7 just before it.
    tokens = _prompts(32)
    cur = Curriculum(np.random.default_rng(1).random(32), stages=2, epochs_per_stage=2, seed=2)
    full = [_key(b) for b in _pipe(tokens, cur)]
    assert len(full) == 16
    p = _pipe(tokens, cur)
    head = [_key(next(p)) for _ in range(cut)]
    state = json.loads(json.dumps(p.get_state()))  # survives a JSON round trip
    assert state["step"] == cut
    resumed = _pipe(tokens, cur)
    resumed.set_state(state)
    rest = [_key(b) for b in resumed]
    assert head + rest == full
    if cut == 8:
        assert rest[0][:3] == (1, 0, 0)


def test_restore_at_start_and_end_and_mismatch():
    tokens = _prompts(16)
    cur = Curriculum(np.zeros(16), stages=1, epochs_per_stage=2)
    p = _pipe(tokens, cur)
    start = p.get_state()
    full = [_key(b) for b in p]
    end = p.get_state()
    q = _pipe(tokens, cur)
    q.set_state(start)
    assert [_key(b) for b in q] == full
    q.set_state(end)
    assert list(q) == []
    with pytest.raises(ValueError, match="global_batch"):
        _pipe(tokens, cur, batch_size=2).set_state(start)
    with pytest.raises(ValueError, match="curriculum"):
        _pipe(tokens, Curriculum(np.zeros(16), stages=1, epochs_per_stage=2, seed=9)).set_state(start)


def test_two_processes_cover_stage_without_overlap():
    n, b = 50, 4  # 50 prompts, global batch 8 -> 6 steps, 2 prompts skipped per epoch
    tokens = _prompts(n)
    cur = Curriculum(np.zeros(n), stages=1, epochs_per_stage=2, seed=3)
    p0, p1 = (_pipe(tokens, cur, batch_size=b, process_index=i, process_count=2) for i in range(2))
    assert p0.steps_per_epoch(0) == 6 and p0.dropped_per_epoch(0) == 2
    b0, b1 = list(p0), list(p1)
    assert len(b0) == len(b1) == 12
    skipped = []
    for epoch in range(2):
        seen = []
        for x, y in zip(b0[6 * epoch: 6 * epoch + 6], b1[6 * epoch: 6 * epoch + 6]):
            assert x.input_ids.shape == y.input_ids.shape  # both processes agree on the bucket of each step
            assert not set(x.indices.tolist()) & set(y.indices.tolist())
            seen += x.indices.tolist() + y.indices.tolist()
        assert len(seen) == len(set(seen)) == 48
        # The union is the epoch's order minus its last 2 prompts (the remainder).
        assert set(seen) == set(cur.epoch_order(0, epoch)[:48].tolist())
        skipped.append(set(range(n)) - set(seen))
    assert skipped[0] != skipped[1]  # the remainder is reshuffled each epoch
    # The global step's prompts do not depend on the process split: 1 process x 8 == 2 x 4.
    single = list(_pipe(tokens, cur, batch_size=8))
    for s, x, y in zip(single, b0, b1):
        assert set(s.indices.tolist()) == set(x.indices.tolist()) | set(y.indices.tolist())
    # ... so a state saved by 2 processes restores in 1.
    q = _pipe(tokens, cur, batch_size=b, process_index=1, process_count=2)
    for _ in range(5):
        next(q)
    one = _pipe(tokens, cur, batch_size=8)
    one.set_state(q.get_state())
    assert _key(next(one))[3] == single[5].indices.tolist()


def test_no_drop_remainder_wraps_with_valid_mask():
    tokens = _prompts(10)
    cur = Curriculum(np.zeros(10), stages=1, epochs_per_stage=1)
    batches = list(_pipe(tokens, cur, batch_size=4, drop_remainder=False))
    assert len(batches) == 3
    idx = [i for b in batches for i in b.indices.tolist()]
    valid = np.concatenate([b.valid for b in batches])
    assert valid.sum() == 10 and not valid[-2:].any()
    assert sorted(np.array(idx)[valid].tolist()) == list(range(10))


def test_construction_errors():
    cur = Curriculum(np.zeros(8), stages=1, epochs_per_stage=1)
    with pytest.raises(ValueError, match="row 2 has 20 tokens > largest bucket 16"):
        _pipe([[1]] * 2 + [[1] * 20] + [[1]] * 5, cur)
    with pytest.raises(ValueError, match="stage 0 has 8 prompts < one global batch"):
        _pipe([[1]] * 8, cur, batch_size=16)
    with pytest.raises(ValueError, match="curriculum covers 8 prompts but 7"):
        _pipe([[1]] * 7, cur)
    with pytest.raises(ValueError, match="buckets"):
        PromptPipeline([[1]] * 8, cur, batch_size=2, pad_id=0, buckets=(8, 4))


def test_arithmetic_end_to_end():
    tok = CharTokenizer()
    recs = ArithmeticTask().make_problems(64, seed=0, split="train")
    tokens, kept, dropped = tokenize_prompts(recs, tok, max_prompt_len=16, suffix="")
    pipe = PromptPipeline(tokens, Curriculum.uniform(len(kept), 1, 0), batch_size=8, pad_id=tok.pad_token_id,
                          buckets=(8, 16))
    b = next(pipe)
    assert b.input_ids.shape == (8, 8)
    row = b.input_ids[0][b.attention_mask[0] == 1]
    assert tok.decode(row) == kept[b.indices[0]].problem + "="


class _ByteTokenizer:
    """Bytes + 1 (0 = pad/eos): enough of the tokenizer interface to run real problems through the pipeline."""

    eos_token_id = pad_token_id = 0
    bos_token_id = None
    vocab_size = 257

    def encode(self, text):
        return [b + 1 for b in text.encode()]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "User: " + messages[0]["content"] + ("\nAssistant:" if add_generation_prompt else "")


def test_real_math500_prompts(shared_data):
    tok = _ByteTokenizer()
    res = load_records(shared_data / "math500.jsonl", max_rows=100)
    tokens, kept, dropped = tokenize_prompts(res.records, tok, max_prompt_len=256)
    assert dropped > 0 and len(kept) + dropped == 100 and max(map(len, tokens)) <= 256
    se = np.array([float(r.extra["level"]) for r in kept])  # MATH level as a stand-in difficulty score
    cur = Curriculum(se, stages=2, epochs_per_stage=1)
    pipe = PromptPipeline(tokens, cur, batch_size=8, pad_id=0, buckets=(128, 256))
    batches = list(pipe)
    assert len(batches) == sum(pipe.steps_per_epoch(s) for s in range(2))
    stage0 = [b for b in batches if b.stage == 0]
    assert max(se[np.concatenate([b.indices for b in stage0])]) <= min(se[cur.stage_indices(1)])
    b = batches[0]
    text = bytes(int(t) - 1 for t in b.input_ids[0][b.attention_mask[0] == 1]).decode()
    assert text.startswith("User: " + kept[b.indices[0]].problem) and text.endswith("\\boxed{}.\nAssistant:")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 60), batch=st.integers(1, 4), procs=st.integers(1, 3), stages=st.integers(1, 3),
       epochs=st.integers(1, 3), seed=st.integers(0, 5), data=st.data())
def test_property_cover_and_resume(n, batch, procs, stages, epochs, seed, data):
    """Any shape: per epoch the processes' batches are disjoint and cover G*steps prompts of the stage;
    resuming every process from a random cut reproduces its uninterrupted stream."""
    tokens = _prompts(n, seed)
    se = np.random.default_rng(seed).random(n)
    cur = Curriculum(se, stages=stages, epochs_per_stage=epochs, seed=seed)
    g = batch * procs
    assume(all(cur.stage_indices(s).size >= g for s in range(cur.num_stages)))
    pipes = [_pipe(tokens, cur, batch_size=batch, process_index=p, process_count=procs) for p in range(procs)]
    streams = [[_key(b) for b in p] for p in pipes]
    per_epoch = {}
    for stream in streams:
        for stage, epoch, _, idx, _ in stream:
            per_epoch.setdefault((stage, epoch), []).extend(idx)
    for (stage, _epoch), idx in per_epoch.items():
        assert len(idx) == len(set(idx)) == pipes[0].steps_per_epoch(stage) * g
        assert set(idx) <= set(cur.stage_indices(stage).tolist())
    cut = data.draw(st.integers(0, len(streams[0])))
    for p in range(procs):
        it = _pipe(tokens, cur, batch_size=batch, process_index=p, process_count=procs)
        head = [_key(next(it)) for _ in range(cut)]
        resumed = _pipe(tokens, cur, batch_size=batch, process_index=p, process_count=procs)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        assert head + [_key(b) for b in resumed] == streams[p]


def _drive(pipe, steps=None):
    """Iterate like the trainer, reporting after each step an SE for its prompts that depends on the
    step (so every epoch re-ranks differently) and on the prompt; returns the batches' keys."""
    out = []
    for b in pipe:
        out.append(_key(b))
        pipe.observe_se(b.indices, ((b.indices * 7 + b.step * 3) % 11) / 10.0)
        if steps is not None and len(out) == steps:
            break
    return out


@pytest.mark.parametrize("mode", ["staged", "continuous"])
def test_online_refresh_reranks_each_epoch_and_resumes_exactly(mode):
    """curriculum.refresh: the first epoch runs on the annotation's ranking; every later one on the
    ranking by the SE reported for the prompts trained on so far (the others keep the annotation's).
    Stage sizes and the number of steps do not change; a state saved anywhere (mid-epoch, at an epoch
    end, at the stage boundary) resumes to the same stream after a JSON round trip."""
    tokens = _prompts(32)
    se = np.random.default_rng(1).random(32)
    cur = Curriculum(se, stages=2, epochs_per_stage=3, seed=2, mode=mode)
    plain = [_key(b) for b in _pipe(tokens, cur)]
    pipe = _pipe(tokens, cur, refresh=True)
    full = _drive(pipe)
    assert len(full) == len(plain) and pipe.refreshes == len(cur.schedule()) - 1
    first = 4 if mode == "staged" else 8  # steps of the first epoch
    assert full[:first] == plain[:first] and full != plain
    sizes = [cur.stage_indices(s).size for s in range(cur.num_stages)]
    assert [pipe.curriculum.stage_indices(s).size for s in range(cur.num_stages)] == sizes
    # the last epoch's ranking is that of the values reported before it began
    ranked = se.copy()
    for i, v in pipe.get_state()["se_ranked"]:
        ranked[i] = v
    assert pipe.curriculum.fingerprint() == cur.refreshed(ranked).fingerprint()
    if mode == "staged":  # some prompts changed stage on the way
        assert set(pipe.curriculum.stage_indices(0).tolist()) != set(cur.stage_indices(0).tolist())
    for cut in (3, 4, 5, 12, 13, len(full) - 1):
        p = _pipe(tokens, cur, refresh=True)
        head = _drive(p, cut)
        resumed = _pipe(tokens, cur, refresh=True)
        resumed.set_state(json.loads(json.dumps(p.get_state())))
        assert head + _drive(resumed) == full, cut


def test_online_refresh_state_must_match_the_setting():
    tokens = _prompts(16)
    cur = Curriculum(np.random.default_rng(0).random(16), stages=1, epochs_per_stage=2)
    with pytest.raises(ValueError, match="refresh"):
        _pipe(tokens, cur, refresh=True).set_state(_pipe(tokens, cur).get_state())
    with pytest.raises(ValueError, match="refresh"):
        _pipe(tokens, cur).set_state(_pipe(tokens, cur, refresh=True).get_state())
    with pytest.raises(ValueError, match="thresholds"):
        _pipe(tokens, Curriculum(np.arange(16.0), thresholds=[8.0], epochs_per_stage=1), refresh=True)
