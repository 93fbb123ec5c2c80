"""entrl.data.curriculum: SE ordering, stages, per-epoch shuffles, options."""

import numpy as np
import pytest

from entrl.data.curriculum import Curriculum


def test_ascending_order_and_equal_count_stages():
    se = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8])
    c = Curriculum(se, stages=2, epochs_per_stage=3)
    assert c.num_stages == 2
    s0, s1 = c.stage_indices(0), c.stage_indices(1)
    assert s0.tolist() == [1, 5, 3, 2] and s1.tolist() == [4, 6, 0]
    assert se[s0].max() <= se[s1].min()
    assert c.schedule() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert c.num_prompts == 7
    assert [d["size"] for d in c.summary()] == [4, 3]


def test_seeded_tie_break():
    se = np.zeros(50)
    se[25:] = 1.0
    a, b = Curriculum(se, seed=0), Curriculum(se, seed=1)
    assert sorted(a.stage_indices(0).tolist()) == list(range(25))  # ties never cross SE levels
    assert a.stage_indices(0).tolist() != list(range(25))  # ... but are not left in file order
    assert a.stage_indices(0).tolist() != b.stage_indices(0).tolist()
    assert a.stage_indices(0).tolist() == Curriculum(se, seed=0).stage_indices(0).tolist()


def test_epoch_shuffles_deterministic_and_distinct():
    se = np.random.default_rng(0).random(200)
    a, b = Curriculum(se, stages=2, seed=3), Curriculum(se, stages=2, seed=4)
    for stage in range(2):
        orders = [a.epoch_order(stage, e) for e in range(a.epochs_per_stage)]
        for o in orders:
            assert sorted(o.tolist()) == sorted(a.stage_indices(stage).tolist())  # a permutation of the stage
        assert len({tuple(o) for o in orders}) == a.epochs_per_stage  # differs across epochs
        assert np.array_equal(orders[1], Curriculum(se, stages=2, seed=3).epoch_order(stage, 1))
        assert not np.array_equal(orders[1], b.epoch_order(stage, 1))  # differs across seeds
    assert a.fingerprint() == Curriculum(se, stages=2, seed=3).fingerprint() != b.fingerprint()


def test_thresholds():
    se = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    c = Curriculum(se, thresholds=[0.5, 1.6])
    assert [c.stage_indices(s).tolist() for s in range(3)] == [[0], [1, 2, 3], [4]]
    with pytest.raises(ValueError, match=r"stage 1 \(SE in \[0.1, 0.2\)\) is empty"):
        Curriculum(se, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="ascending"):
        Curriculum(se, thresholds=[1.0, 0.5])


def test_continuous_single_unshuffled_pass():
    se = np.random.default_rng(1).random(30)
    c = Curriculum(se, stages=3, mode="continuous", epochs_per_stage=2)
    assert c.num_stages == 1
    expected = np.argsort(se, kind="stable")
    assert np.array_equal(c.epoch_order(0, 0), expected) and np.array_equal(c.epoch_order(0, 1), expected)


def test_drop_trivial():
    se = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    pr = np.array([0.0, 0.5, 1.0, 0.25, 1.0])
    c = Curriculum(se, stages=1, pass_rate=pr, drop_trivial=True)
    assert c.dropped_trivial == 3 and c.stage_indices(0).tolist() == [1, 3]
    assert Curriculum(se, stages=1, pass_rate=pr).dropped_trivial == 0
    with pytest.raises(ValueError, match="needs pass_rate"):
        Curriculum(se, drop_trivial=True)
    with pytest.raises(ValueError, match="removed all"):
        Curriculum(se, pass_rate=np.ones(5), drop_trivial=True)


def test_drop_trivial_without_pass_rates_is_a_config_error():
    """A data file with an SE column but no pass_rate (not written by `entrl semantic-entropy`) must not
    silently keep every prompt under curriculum.drop_trivial."""
    from entrl import config as C
    from entrl.data.sources import Record
    from entrl.rl.setup import build_curriculum

    cfg = C.load_config(None, ["curriculum.drop_trivial=true", "curriculum.stages=1"])
    annotated = [Record(str(i), "1+1", "2", {"se": 0.1 * i, "pass_rate": pr}) for i, pr in enumerate([0, 0.5, 1])]
    assert build_curriculum(cfg, annotated).dropped_trivial == 2
    bare = [*annotated[:2], Record("2", "1+1", "2", {"se": 0.2})]
    with pytest.raises(C.ConfigError, match="1 records lack it"):
        build_curriculum(cfg, bare)


def test_uniform_and_validation():
    u = Curriculum.uniform(10, epochs=3, seed=0)
    assert u.num_stages == 1 and sorted(u.stage_indices(0).tolist()) == list(range(10))
    assert len({tuple(u.epoch_order(0, e)) for e in range(3)}) == 3
    with pytest.raises(ValueError, match="row 2"):
        Curriculum([0.1, 0.2, np.nan])
    with pytest.raises(ValueError, match="stages=5 > number of prompts"):
        Curriculum([0.1, 0.2], stages=5)
    with pytest.raises(ValueError, match="epoch 3 out of range"):
        u.epoch_order(0, 3)
    with pytest.raises(ValueError, match="stage 1 out of range"):
        u.stage_indices(1)


def test_orders_of_the_ablation():
    """high_to_low: the same SE quantiles, hardest first; random: stages of a seeded permutation, SE ignored."""
    se = np.random.default_rng(2).random(40)
    up = Curriculum(se, stages=2, seed=5)
    down = Curriculum(se, stages=2, seed=5, order="high_to_low")
    assert sorted(down.stage_indices(0).tolist()) == sorted(up.stage_indices(1).tolist())
    assert se[down.stage_indices(0)].min() >= se[down.stage_indices(1)].max()
    assert np.all(np.diff(se[down.stage_indices(0)]) <= 0)  # descending inside the stage order too
    rand = Curriculum(se, stages=2, seed=5, order="random")
    assert [s.size for s in (rand.stage_indices(0), rand.stage_indices(1))] == [20, 20]
    assert sorted(np.concatenate([rand.stage_indices(0), rand.stage_indices(1)]).tolist()) == list(range(40))
    assert se[rand.stage_indices(0)].max() > se[rand.stage_indices(1)].min()  # not an SE split
    assert np.array_equal(rand.stage_indices(0), Curriculum(np.zeros(40), stages=2, seed=5, order="random")
                          .stage_indices(0))  # the split does not depend on SE at all
    assert not np.array_equal(rand.stage_indices(0), Curriculum(se, stages=2, seed=6, order="random").stage_indices(0))
    assert rand.fingerprint() != up.fingerprint() != down.fingerprint()
    th = Curriculum(np.array([0.0, 0.5, 1.0, 1.5, 2.0]), thresholds=[0.5, 1.6], order="high_to_low")
    assert [th.stage_indices(s).tolist() for s in range(3)] == [[4], [3, 2, 1], [0]]
    with pytest.raises(ValueError, match="order="):
        Curriculum(se, order="sideways")
    with pytest.raises(ValueError, match="random"):
        Curriculum(se, thresholds=[0.5], order="random")
