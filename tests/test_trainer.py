"""The RL trainer end to end on tiny demo configs (issue 8's "must show" list).

In-process runs use the 8 fake CPU devices of conftest on a (data 4, tensor 2) mesh and a
deterministic stand-in verifier (reward = parity of a hash of the response), because a random-init
policy never answers the arithmetic prompts: the stand-in gives mixed groups, hence real advantages
and real updates, without changing anything else in the loop. The CLI runs use the real verifier and
the `entropy_bonus` loss, whose gradient needs no reward signal.

Every run shares one set of shapes (4 prompts x 4 samples x 12 tokens, mini-batches of 8 rows in
micro-batches of 4), so the sampler and log-prob programs compile once; each loss compiles its own
update. The 2-process tests run `entrl train` in subprocesses: one with 2 devices against two with 1 each,
and 2 processes x 4 devices with the params sharded over both (policy/ and `entrl export` under the launcher).
"""

import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from doubles import ParityVerifier

from entrl import cli
from entrl import config as C
from entrl.checkpoint import CheckpointManager, nonfinite_leaves
from entrl.data.sources import Record
from entrl.metrics import read_metrics
from entrl.rewards import RewardResult
from entrl.rl.loss_specs import LOSSES
from entrl.rl.setup import setup
from entrl.rl.trainer import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "rollout.n=4",
        "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.minibatch_prompts=2",
        "train.microbatch_per_shard=1", "data.arithmetic_train_size=64", "data.arithmetic_heldout_size=16",
        "curriculum.enabled=false", "reward.workers=1", "loss.kl_coef=0.001", "optim.lr=1e-3",
        "train.tensorboard=false", "train.length_buckets=1"]
MESH = ["mesh.data=4", "mesh.tensor=2"]  # the 8 test devices
# The diagnostics of docs/method.md ("What to log") plus the per-phase timings of issue 8.
SECTION_11 = ("entropy", "reward", "accuracy", "response_length", "truncation_rate", "abs_logratio_mean", "ref_kl",
              "clip_frac", "penalized_frac", "cov_mean", "cov_max", "zero_var_group_frac",
              "batch_semantic_entropy", "stage", "time/rollout", "time/reward", "time/logprob", "time/update",
              "tokens_per_s", "loss", "grad_norm", "skipped_nonfinite")
CURRICULUM = ["curriculum.enabled=true", "curriculum.annotate=true", "curriculum.samples=4", "curriculum.stages=2",
              "curriculum.epochs_per_stage=1", "data.arithmetic_train_size=16",
              "train.stage_boundary=reset_optimizer", "train.eval_every=2"]
# The released recipe's boundary: stage 2 is a new run from the stage-1 policy (reference and optimizer).
RESTART = [*CURRICULUM[:-2], "train.stage_boundary=restart", "train.eval_every=2"]


def make_cfg(out_dir, *extra) -> C.RunConfig:
    return C.load_config(DEMO, TINY + MESH + [f"train.out_dir={out_dir}", *extra])


def run_trainer(cfg, *, max_steps=None, wrap_update=None):
    """setup + Trainer.run (resuming from out_dir if it has checkpoints) + close; returns the Trainer."""
    trainer = Trainer(setup(cfg, verifier=ParityVerifier()))
    if wrap_update is not None:
        trainer.update = wrap_update(trainer, trainer.update)
    try:
        trainer.run(max_steps=max_steps)
    finally:
        trainer.close()
    return trainer


def _numeric(record):
    return {k: v for k, v in record.items() if k not in ("step", "time", "tokens_per_s") and not k.startswith("time/")}


def assert_same_metrics(run_a, run_b, tol):
    a, b = read_metrics(run_a), read_metrics(run_b)
    for run, records in ((run_a, a), (run_b, b)):  # one line per step: a resumed run dropped the redone ones
        assert len((Path(run) / "metrics.jsonl").read_text().splitlines()) == len(records), run
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        na, nb = _numeric(ra), _numeric(rb)
        assert na.keys() == nb.keys()
        for k in na:
            assert abs(na[k] - nb[k]) <= tol, f"step {ra['step']} {k}: {na[k]} vs {nb[k]}"


def assert_same_params(pa, pb, tol=1e-6):
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert float(jnp.max(jnp.abs(x - y))) <= tol


def _host(tree):
    return jax.tree.map(np.asarray, tree)


class CountingTask:
    """An `entrl.seams.Task` double: 8 problems `k+1` of its own, no instruction, and a reward that grades a
    response right iff it holds an even number of characters (counting what it was asked to grade)."""

    instruction = ""

    def __init__(self):
        self.graded = self.right = 0

    def records(self):
        return [Record(id=f"count{k}", problem=f"{k}+1", answer=str(k + 1)) for k in range(8)], None

    def reward(self):
        task = self

        class EvenLength(ParityVerifier):
            def score(self, responses, references):
                assert set(references) <= {str(k + 1) for k in range(8)}  # the task's own answers
                correct = np.array([len(r) % 2 == 0 for r in responses])
                task.graded, task.right = task.graded + len(responses), task.right + int(correct.sum())
                counts = {"correct": int(correct.sum()), "incorrect": int((~correct).sum()), "total": len(correct)}
                return RewardResult(correct.astype(np.float32), correct, [None] * len(responses),
                                    ["correct" if c else "incorrect" for c in correct], counts)

        return EvenLength()


def test_a_task_supplies_the_prompts_answers_and_reward(tmp_path):
    task = CountingTask()
    comps = setup(make_cfg(tmp_path, "train.steps=1"), task=task)
    assert [r.id for r in comps.records] == [f"count{k}" for k in range(8)]
    assert comps.tokenizer.decode(comps.prompt_tokens[3]) == "3+1="  # no instruction appended
    trainer = Trainer(comps)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert task.graded == 4 * 4  # train.prompts_per_step x rollout.n responses, all graded by the task's reward
    assert read_metrics(tmp_path)[0]["reward"] == pytest.approx(task.right / task.graded)


# ---------------------------------------------------------------------------
# Smoke test per loss
# ---------------------------------------------------------------------------


def _recording_dealt_rows(monkeypatch):
    """(calls of `balanced_shard_order`: (lengths, shards, order), wrap_update keeping each mini-batch's
    sequence lengths)."""
    from entrl.rl import trainer as trainer_module

    real, calls, seen = trainer_module.balanced_shard_order, [], []

    def recording(lengths, shards):
        calls.append((np.asarray(lengths), shards, real(lengths, shards)))
        return calls[-1][2]

    def wrap(trainer, update):
        def capture(params, opt_state, mb, rng):
            seen.append(np.asarray(mb["prompt_mask"]).sum(1) + np.asarray(mb["resp_len"]))
            return update(params, opt_state, mb, rng)
        return capture

    monkeypatch.setattr(trainer_module, "balanced_shard_order", recording)
    return calls, seen, wrap


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_smoke_every_loss(tmp_path, loss, monkeypatch):
    """Every loss trains 2 steps with finite metrics. Under the micro-batch selection scope (sent_released's)
    the rows reach the update dealt to the data shards as verl's balance_batch deals them to its ranks:
    length-balanced sets, each in rollout order, cut into the mini-batches as before."""
    scoped = LOSSES[loss].scope == "microbatch"
    # the release's 4-sequence selection scopes do not fit the 2 sequences per shard of this tiny run
    scope = ["loss.scope_seqs=2"] if scoped else []
    calls, seen, wrap = _recording_dealt_rows(monkeypatch)
    trainer = run_trainer(make_cfg(tmp_path, f"loss.name={loss}", "train.steps=2", *scope), wrap_update=wrap)
    assert len(calls) == (2 if scoped else 0)
    for step, (lengths, shards, order) in enumerate(calls):
        assert shards == 4 and sorted(order) == list(range(len(lengths)))
        assert all(list(s) == sorted(s) for s in order.reshape(shards, -1))  # rollout order inside a shard
        dealt = lengths[order].reshape(shards, 2, -1)  # [shard, mini-batch, its rows there]
        for j, got in enumerate(seen[2 * step:2 * step + 2]):
            assert got.tolist() == dealt[:, j].reshape(-1).tolist()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        missing = [k for k in SECTION_11 if k not in r]
        assert not missing, f"{loss}: metrics.jsonl lacks {missing}"
        bad = [k for k, v in r.items() if isinstance(v, float) and not np.isfinite(v) or v is None]
        assert not bad, f"{loss}: non-finite metrics {bad}"
        assert r["skipped_nonfinite"] == 0
    assert any(r["grad_norm"] > 0 for r in records)  # real updates happened
    assert CheckpointManager(tmp_path / "checkpoints").latest_step() == 2
    assert trainer.step == 2


def test_bf16_compute_moves_float32_master_weights_at_paper_lr(tmp_path):
    """The paper's lr 1e-6 under bf16 compute: with float32 masters (the default) 3 RL steps move >= 99% of
    the weights; kept in bfloat16 themselves, almost none move (a 1e-6 step rounds away)."""
    moved = {}
    for param_dtype in ("float32", "bfloat16"):
        cfg = make_cfg(tmp_path / param_dtype, "model.dtype=bfloat16", f"model.param_dtype={param_dtype}",
                       "optim.lr=1e-6", "train.steps=3", "loss.name=grpo", "train.only_mixed_groups=false")
        comps = setup(cfg, verifier=ParityVerifier())
        before = _host(comps.params)
        assert {x.dtype for x in jax.tree.leaves(before)} == {np.dtype(param_dtype)}
        trainer = Trainer(comps)
        trainer.run(resume=False)
        trainer.close()
        after = jax.tree.leaves(_host(trainer.params))
        moved[param_dtype] = (sum(int((a != b).sum()) for a, b in zip(jax.tree.leaves(before), after))
                              / sum(a.size for a in after))
    assert moved["float32"] >= 0.99, moved
    assert moved["bfloat16"] < 0.1, moved


def test_slots_and_length_buckets_train_exactly_as_one_shot_full_length(tmp_path):
    """rollout.slots=8 (16 rows, 2 slots per data shard: continuous batching) with length-sorted, trimmed
    micro-batches (train.length_buckets=4) trains exactly like the one-shot sampler with full-length
    micro-batches: same samples (per-row draws), same losses and updates (exact trimming), step for step."""
    extra = ["train.steps=2", "train.microbatch_per_shard=1", "loss.name=sent"]
    base = run_trainer(make_cfg(tmp_path / "base", *extra))
    fast = run_trainer(make_cfg(tmp_path / "fast", *extra, "rollout.slots=8", "train.length_buckets=4"))
    assert fast.comps.sampler.config.slots == 8 and fast.settings.length_buckets == 4 and fast.settings.num_micro == 2
    records = read_metrics(tmp_path / "base")
    assert 1 < np.mean([r["response_length"] for r in records]) < 12  # ragged: there is something to trim
    assert_same_metrics(tmp_path / "base", tmp_path / "fast", tol=1e-5)
    assert_same_params(base.params, fast.params, tol=1e-5)


# ---------------------------------------------------------------------------
# Resume, corrupt checkpoints
# ---------------------------------------------------------------------------


def _capture_first_minibatch(seen):
    """wrap_update that keeps (RL step, ref_logp, old_logp, mask) of each step's first mini-batch."""
    def wrap(trainer, update):
        def capture(params, opt_state, mb, rng):
            if not seen or seen[-1][0] != trainer.step + 1:
                seen.append((trainer.step + 1, *(np.asarray(mb[k]) for k in ("ref_logp", "old_logp", "resp_mask"))))
            return update(params, opt_state, mb, rng)
        return capture
    return wrap


@pytest.fixture(scope="module", params=["plain", "curriculum", "restart"])
def resume_runs(request, tmp_path_factory):
    """(extra overrides, straight 4-step run dir, its final params, run dir stopped after `half` steps with
    checkpoints up to there, kind, the straight run's Trainer, its first mini-batch of every step).

    The curriculum has 2 steps per stage: "curriculum" stops at the boundary (step 2), where the online SE
    refresh re-ranks the prompts on resuming, "restart" after it (step 3), where the reference is the
    stage-1 policy and no longer the initial model."""
    extra = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    # "curriculum" also re-ranks its prompts by their rollouts' SE at the epoch (= stage) boundary
    extra += {"plain": [], "curriculum": [*CURRICULUM, "curriculum.refresh=true"], "restart": RESTART}[request.param]
    root = tmp_path_factory.mktemp(f"resume_{request.param}")
    seen = []
    straight = run_trainer(make_cfg(root / "straight", *extra), wrap_update=_capture_first_minibatch(seen))
    half_steps = 3 if request.param == "restart" else 2
    half = run_trainer(make_cfg(root / "half", *extra), max_steps=half_steps)
    assert straight.step == 4 and half.step == half_steps
    return extra, root / "straight", _host(straight.params), root / "half", request.param, straight, seen


def test_resume_equals_straight_run(resume_runs, tmp_path):
    extra, straight, straight_params, half, kind, straight_trainer, _ = resume_runs
    run = tmp_path / "resumed"
    shutil.copytree(half, run)
    cfg = make_cfg(run, *extra)
    starting = []  # the weights the resumed run was built with: freed when the checkpoint's replace them
    resumed = run_trainer(cfg, wrap_update=lambda trainer, update: starting.extend(jax.tree.leaves(trainer.params))
                          or update)
    assert starting and all(x.is_deleted() for x in starting)  # not a second copy held through the run
    assert [h["step"] for h in resumed.history] == ([4] if kind == "restart" else [3, 4])  # where it stopped
    assert_same_metrics(straight, run, tol=1e-6)
    assert_same_params(straight_params, resumed.params)
    fresh = setup(cfg, verifier=ParityVerifier())
    if kind == "restart":  # the stage-2 reference, read back from reference/stage1: the straight run's
        assert (run / "reference" / "stage1").is_dir()
        assert_same_params(straight_trainer.comps.ref_params, resumed.comps.ref_params, tol=0)
        assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(fresh.ref_params),
                                                                   jax.tree.leaves(resumed.comps.ref_params))) > 0
    else:  # the reference policy is the initial model, not the resumed one
        assert_same_params(fresh.ref_params, resumed.comps.ref_params, tol=0)
    if kind == "curriculum":  # one re-ranking, at the boundary: in the straight run and after resuming
        assert straight_trainer.comps.pipeline.refreshes == resumed.comps.pipeline.refreshes == 1
        assert straight_trainer.comps.pipeline.get_state()["se_live"] == resumed.comps.pipeline.get_state()["se_live"]
    if kind != "plain":
        records = read_metrics(run)
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # step 0: the initial policy (val.before_training)
        assert [r.get("stage") for r in records] == [None, 0, 0, 1, 1]
        assert all("eval/pass@1" in records[i] for i in (0, 2, 4)) and "eval/pass@1" not in records[1]


@pytest.mark.parametrize("resume_runs", ["curriculum"], indirect=True)
def test_a_fresh_start_over_metrics_of_a_run_that_never_checkpointed(resume_runs, tmp_path):
    """Killed before its first checkpoint, a run starts afresh in the same directory: every metric line of the
    dead run goes, its step-0 evaluation (val.before_training) included, so no step is logged twice."""
    extra, straight, _, half, *_ = resume_runs
    run = tmp_path / "restarted"
    shutil.copytree(half, run, ignore=lambda d, names: [n for n in names if n == "checkpoints"])
    step0 = lambda d: [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()].count(0)  # noqa: E731
    assert step0(run) == step0(straight) == 1
    run_trainer(make_cfg(run, *extra), max_steps=1)
    assert step0(run) == 1 and [r["step"] for r in read_metrics(run)] == [0, 1]


@pytest.mark.parametrize("resume_runs", ["curriculum", "restart"], indirect=True)  # the runs with stage boundaries
def test_restart_boundary_swaps_the_reference(resume_runs):
    """stage_boundary=restart: in the first step of stage 2 the reference log-probs ARE the stage-1 policy's
    (the old log-probs of that step, computed with the same params), while before the boundary, and with
    the other boundary modes, the reference stays the initial model. The optimizer starts afresh too."""
    *_, kind, trainer, seen = resume_runs
    steps = {step: (ref, old, mask.astype(bool)) for step, ref, old, mask in seen}
    assert sorted(steps) == [1, 2, 3, 4]
    gap = {step: float(np.abs(ref - old)[mask].max()) for step, (ref, old, mask) in steps.items()}
    assert gap[1] == 0.0  # step 1: the policy is still the initial model
    assert gap[2] > 1e-4  # stage 1 moved it away from the reference
    if kind == "restart":
        assert gap[3] == 0.0, gap  # right after the boundary: reference == stage-1 policy, exactly
        assert gap[4] > 1e-4
    else:
        assert gap[3] > 1e-4, gap  # reset_optimizer keeps the initial reference
    # Both reset the optimizer at the boundary: its counters hold stage 2's 2 steps x 2 mini-batches only.
    counts = {int(x) for path, x in jax.tree_util.tree_leaves_with_path(trainer.opt_state)
              if "count" in jax.tree_util.keystr(path)}
    assert counts == {4}, counts


@pytest.mark.parametrize("resume_runs", ["plain"], indirect=True)
def test_corrupt_latest_checkpoint_falls_back(resume_runs, tmp_path, caplog):
    extra, straight, straight_params, half, *_ = resume_runs
    run = tmp_path / "corrupt"
    shutil.copytree(half, run)
    for f in (run / "checkpoints" / "2" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="entrl.checkpoint"):
        resumed = run_trainer(make_cfg(run, *extra))
    assert any("step 2" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert [h["step"] for h in resumed.history] == [2, 3, 4]  # resumed from step 1
    assert_same_metrics(straight, run, tol=1e-6)
    assert_same_params(straight_params, resumed.params)


@pytest.mark.parametrize("resume_runs", ["plain"], indirect=True)
def test_fresh_start_refuses_a_directory_with_checkpoints(resume_runs, tmp_path):
    """A fresh start could never save over the old steps (orbax skips them): refused, nothing written."""
    extra, _, _, half, *_ = resume_runs
    run = tmp_path / "used"
    shutil.copytree(half, run)
    metrics = (run / "metrics.jsonl").read_text()
    trainer = Trainer(setup(make_cfg(run, *extra), verifier=ParityVerifier()))
    try:
        with pytest.raises(C.ConfigError, match="already holds checkpoints up to step 2"):
            trainer.run(resume=False)
    finally:
        trainer.close()
    assert (run / "metrics.jsonl").read_text() == metrics


def _problems(path, n, prefix):
    rows = [{"id": f"{prefix}{i}", "problem": f"{1 + i % 9}+{1 + i // 9}", "answer": str(2 + i % 9 + i // 9)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_during_training_for_the_math_task(tmp_path):
    """data.task=math has no held-out split: train.eval_every evaluates val.data (here a local JSONL file,
    its first 3 problems), n=2 samples each, at step 0 (the initial policy) and after every step; the
    logged numbers are those of the policy of that step, and `entrl plot` draws them against the step."""
    train, heldout = _problems(tmp_path / "train.jsonl", 16, "t"), _problems(tmp_path / "eval.jsonl", 5, "e")
    run = tmp_path / "run"
    cfg = make_cfg(run, "data.task=math", f"data.train={train}", "data.prompt_suffix=", "train.steps=2",
                   "train.eval_every=1", f"val.data={heldout}", "val.max_problems=3", "val.n=2", "val.k=[1, 2]")
    trainer = run_trainer(cfg)
    assert [r.id for r in trainer.comps.heldout[1]] == ["e0", "e1", "e2"]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        # 3 problems x 2 samples: pass@1 counts correct samples of 6, pass@2 problems of 3; avg@2 = pass@1 at k = n
        assert r["eval/pass@1"] * 6 == pytest.approx(round(r["eval/pass@1"] * 6))
        assert r["eval/pass@2"] * 3 == pytest.approx(round(r["eval/pass@2"] * 3))
        assert r["eval/avg@2"] == pytest.approx(r["eval/pass@1"])
        assert r["eval/response_length"] > 0
    from entrl.evaluation import evaluate_prompts

    prompts, recs = trainer.comps.heldout
    again = evaluate_prompts(trainer._eval_sampler, trainer.comps.graphdef, trainer.params, trainer.comps.tokenizer, prompts,
                             [r.answer for r in recs], verifier=ParityVerifier(), n=2, ks=(1, 2),
                             seed=cfg.train.seed + 10_000, batch_prompts=8, buckets=(8,))
    assert (again["pass@1"], again["pass@2"]) == (records[2]["eval/pass@1"], records[2]["eval/pass@2"])
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots" / "eval.png").stat().st_size > 1000


def test_train_with_a_warm_start_makes_it_once(tmp_path, capsys):
    """`entrl train` on a warmstart.enabled config: the demo model's noisy-teacher SFT goes to
    <out_dir>/warmstart and RL starts from it; the resumed command reuses it (not trained again)."""
    run = tmp_path / "run"
    args = ["train", DEMO, *TINY, *MESH, f"train.out_dir={run}", "loss.name=entropy_bonus", "loss.kl_coef=0.0",
            "train.only_mixed_groups=false", "warmstart.enabled=true", "warmstart.steps=3", "warmstart.problems=64",
            "warmstart.batch=8", "train.steps=1", "train.checkpoint_every=1"]
    assert cli.main(args) == 0
    warm = run / "warmstart" / "model.safetensors"
    stamp = warm.stat().st_mtime_ns
    assert (run / "policy" / "config.json").exists()
    assert cli.main([*args[:-2], "train.steps=2", "train.checkpoint_every=1"]) == 0  # resumes at step 1
    assert warm.stat().st_mtime_ns == stamp and [r["step"] for r in read_metrics(run)] == [1, 2]
    record = json.loads((run / "entrl_run.json").read_text())  # the config the run started with, kept
    assert record["train"]["steps"] == 1 and record["warmstart"]["enabled"] and record["model"]["path"] == "demo"
    resumes = [json.loads(line) for line in (run / "entrl_resumes.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in resumes] == [{"train.steps": [1, 2]}]
    capsys.readouterr()
    assert cli.main([*args[:-2], "train.steps=3", "loss.name=grpo"]) == 2  # refused before anything is built
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loss.name was 'entropy_bonus', now 'grpo'" in err and "train.steps" not in err, err
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and json.loads((run / "entrl_run.json").read_text()) == record


def test_curriculum_stages_smaller_than_a_step_are_config_errors(tmp_path):
    """Stages of SE thresholds are sized by the annotation: checked after it, in one line naming the keys to
    change (never the pipeline's internal drop_remainder); before it, whether the prompts could fill them."""
    from entrl.rl.setup import build_curriculum, check_stage_sizes, stage_sizes

    records = [Record(f"p{i}", f"{i}+1", str(i + 1), extra={"se": se}) for i, se in enumerate([0.1] * 5 + [0.9] * 3)]
    cfg = make_cfg(tmp_path, "curriculum.enabled=true", "curriculum.thresholds=[0.5]")
    assert stage_sizes(cfg, 8) is None
    with pytest.raises(C.ConfigError, match=r"^curriculum stage 1 holds 3 of the 8 usable prompts, fewer than one "
                                            r"step of train.prompts_per_step=4: .*curriculum.thresholds"):
        check_stage_sizes(cfg, 8, build_curriculum(cfg, records))
    with pytest.raises(C.ConfigError, match=r"^7 usable prompts cannot fill 2 curriculum stage\(s\)"):
        check_stage_sizes(cfg, 7)
    with pytest.raises(C.ConfigError, match=r"^curriculum.thresholds: curriculum stage 1 .* is empty"):
        build_curriculum(make_cfg(tmp_path, "curriculum.enabled=true", "curriculum.thresholds=[2.0]"), records)
    staged = make_cfg(tmp_path, "curriculum.enabled=true", "curriculum.stages=3")
    assert stage_sizes(staged, 14) == [5, 5, 4]
    with pytest.raises(C.ConfigError, match=r"curriculum stage 0 holds 3 of the 7 .*lower curriculum.stages"):
        check_stage_sizes(staged, 7)
    with pytest.raises(C.ConfigError, match=r"^3 usable prompts, fewer than one step of train.prompts_per_step=4"):
        check_stage_sizes(make_cfg(tmp_path), 3)


def test_decaying_schedule_spans_the_curriculum_when_train_steps_is_0():
    """train.steps=0 runs until the curriculum is exhausted: a linear schedule decays over those steps, not one."""
    from entrl.rl.trainer import run_optimizer

    cfg = C.load_config(DEMO, ["optim.schedule=linear", "train.steps=0", "train.prompts_per_step=8",
                               "train.minibatch_prompts=8"])
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}

    def second_update(opt):
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
        return float(jnp.abs(opt.update(grads, state, params)[0]["w"]).sum())

    assert second_update(run_optimizer(cfg)) == 0.0  # decayed to 0 after one step
    assert second_update(run_optimizer(cfg, 10)) > 0


def test_eval_set_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = cli.main(["train", DEMO, *TINY, *MESH, f"train.out_dir={tmp_path / 'run'}", "train.eval_every=1",
                     f"val.data={missing}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("entrl: config error: val.data=") and "\n" not in err, err


# ---------------------------------------------------------------------------
# Reward functions from config, start-up summary, progress, sample logs
# ---------------------------------------------------------------------------

_PARITY_REWARD = """
import json, zlib

CALLS = {calls!r}


def parity(response, reference, record):
    with open(CALLS, "a") as f:
        f.write(json.dumps({{"reference": reference, "record": record}}) + "\\n")
    return float(zlib.crc32(response.encode()) % 2 == 0)
"""


def test_reward_fn_from_config_drives_a_training_step(tmp_path, caplog):
    """reward.fn names a function in a user's file: the real verifier's workers call it once per response with the
    reference answer and the prompt's row, its weighted value is the reward the advantages use (mixed groups
    from it alone: the random-init policy never answers right), reward/<name> is logged, and rollouts.jsonl
    holds the samples of every train.log_samples_every steps with each term's value. The start-up summary
    is logged once, on its own lines."""
    calls = tmp_path / "calls.jsonl"
    module = tmp_path / "my_rewards.py"
    module.write_text(_PARITY_REWARD.format(calls=str(calls)))
    run = tmp_path / "run"
    cfg = make_cfg(run, "train.steps=2", "train.log_samples_every=1", "train.only_mixed_groups=false",
                   f"reward.fn=[entrl.rewards:math_reward, {module}:parity]", "reward.weights=[1.0, 0.5]")
    comps = setup(cfg)
    trainer = Trainer(comps)
    try:
        with caplog.at_level(logging.INFO, logger="entrl.train"):
            trainer.run()
    finally:
        trainer.close()
        comps.verifier.close()
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == 2 * 4 * 4  # steps x prompts x samples: every response once
    by_id = {r.id: r for r in comps.records}
    for call in seen:
        rec = by_id[call["record"]["id"]]
        assert call["reference"] == rec.answer == call["record"]["answer"] and call["record"]["problem"] == rec.problem
    records = read_metrics(run)
    for r in records:
        assert r["reward/parity"] > 0 and r["reward_failures/parity"] == 0 and r["reward/math_reward"] == 0
        assert r["reward"] == pytest.approx(r["reward/math_reward"] + 0.5 * r["reward/parity"], abs=1e-6)
        assert r["zero_var_group_frac"] < 1 and r["grad_norm"] > 0  # the parity reward made the advantages
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == [1, 2] and len(rows) == 8  # 4 prompts' samples per step
    for row in rows:
        parity = float(zlib.crc32(row["response"].encode()) % 2 == 0)
        assert row["rewards"] == {"math_reward": 0.0, "parity": parity} and row["reward"] == 0.5 * parity
        assert row["reference"] == by_id[row["id"]].answer and row["prompt"].startswith(by_id[row["id"]].problem)
    lines = [r.getMessage() for r in caplog.records if r.name == "entrl.train"]
    start = lines.index("run summary")
    summary = "\n".join(lines[start:start + 12])
    for needle in ("model       demo (", "mesh        data 4 x fsdp 1 x tensor 2 = 8 cpu devices",
                   "4 prompts x 4 samples = 16 sequences per step", "steps       2 (train.steps=2)",
                   f"1 x entrl.rewards:math_reward + 0.5 x {module}:parity", f"output      {run}"):
        assert needle in summary, (needle, summary)
    assert lines.count("run summary") == 1


def test_progress_bars_of_annotation_and_training(tmp_path, capsys, caplog):
    """train.progress=on: a bar for the SE annotation (prompts), one for training (steps) whose total is the
    curriculum's when train.steps is 0, each with its count, elapsed time and ETA, and a transient one for
    each evaluation of the val set, on stderr. The run's summary is logged before the annotation too (with the
    stages pending), not only after it."""
    cfg = make_cfg(tmp_path, *CURRICULUM, "train.steps=0", "train.progress=on")
    with caplog.at_level(logging.INFO, logger="entrl.setup"):
        trainer = run_trainer(cfg)
    early = [r.getMessage() for r in caplog.records if r.name == "entrl.setup"]
    summary = "\n".join(early[early.index("run summary"):])
    assert "16 prompts from arithmetic task" in summary and "steps       known after the annotation" in summary
    err = capsys.readouterr().err
    total = trainer.comps.pipeline.total_steps
    assert total == 4 and trainer.step == total  # 16 prompts in 2 stages of 1 epoch, 4 prompts per step
    assert re.search(r"semantic entropy: +100%\|.*\| 16/16 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert re.search(rf"train: +\d+%\|.*\| 1/{total} \[\d\d:\d\d<\d\d:\d\d", err), err  # an ETA after step 1
    assert re.search(rf"train: +100%\|.*\| {total}/{total} \[", err), err
    assert re.search(r"eval: +\d+%\|.*\| \d+/16 \[", err), err  # drawn, then erased (it may not show 100%)


# ---------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------


def _poison_steps(steps):
    """Wrap the jitted update so the mini-batches of the given (1-based) RL steps carry NaN old log-probs."""
    def wrap(trainer, update):
        def poisoned(params, opt_state, mb, rng):
            if trainer.step + 1 in steps:
                mb = dict(mb, old_logp=mb["old_logp"] * jnp.nan)
            return update(params, opt_state, mb, rng)
        return poisoned
    return wrap


def _checkpoint_params(run_dir, step, like):
    """The params saved at `step` (restored through a manager that sees only that step)."""
    tmp = run_dir / f"only_{step}"
    (tmp / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / str(step), tmp / "checkpoints" / str(step))
    mgr = CheckpointManager(tmp / "checkpoints")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    got = mgr.restore_latest(params_target=abstract, strict=True)
    mgr.close()
    assert got.step == step
    return got.params


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, caplog):
    cfg = make_cfg(tmp_path, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=6",
                   "train.max_nonfinite_steps=2", "train.only_mixed_groups=false")
    with caplog.at_level(logging.WARNING, logger="entrl.train"), pytest.raises(NonFiniteError) as err:
        run_trainer(cfg, wrap_update=_poison_steps({2, 4, 5}))
    assert "2 consecutive steps" in str(err.value) and "train.max_nonfinite_steps" in str(err.value)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the failing step is logged, then the run stops
    assert [r["skipped_nonfinite"] for r in records] == [0, 1, 0, 1, 1]
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 3
    # Skipped steps never reach a checkpoint: step 2 saved step 1's state, step 4 step 3's; step 5 none.
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert mgr.all_steps() == [1, 2, 3, 4]
    mgr.close()
    like = setup(cfg, verifier=ParityVerifier()).params
    saved = {s: _checkpoint_params(tmp_path, s, like) for s in (1, 2, 3, 4)}
    for s, params in saved.items():
        assert not nonfinite_leaves(params), s
    assert_same_params(saved[1], saved[2], tol=0)
    assert_same_params(saved[3], saved[4], tol=0)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(saved[2]),
                                                                jax.tree.leaves(saved[3]))) > 0
    # Step 4's checkpoint keeps the streak (1 skipped step): resumed there, the run stops at step 5 as it did.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "checkpoints", resumed / "checkpoints",
                    ignore=lambda d, names: [n for n in names if n == "5"])
    shutil.copy(tmp_path / "entrl_run.json", resumed / "entrl_run.json")
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(up to step 5\)"):
        run_trainer(make_cfg(resumed, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=6",
                             "train.max_nonfinite_steps=2", "train.only_mixed_groups=false"),
                    wrap_update=_poison_steps({5}))


# ---------------------------------------------------------------------------
# The CLI: SIGTERM, export, plot, bad input
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`entrl train` (real verifier, TensorBoard on) that receives SIGTERM during step 2 of 4."""
    out = tmp_path_factory.mktemp("cli") / "run"
    args = _cli_args(out)
    real = Trainer.rl_step
    calls = []
    before = signal.getsignal(signal.SIGTERM)

    def rl_step(self, batch):
        calls.append(self.step)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step, like a preemption notice
        return real(self, batch)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "rl_step", rl_step)
    stderr = io.StringIO()
    mp.setattr(sys, "stderr", stderr)
    try:
        code = cli.main(args)
    finally:
        mp.undo()
    assert signal.getsignal(signal.SIGTERM) == before  # the trainer put the previous handler back
    return code, out, calls, stderr.getvalue().strip()


def _cli_args(out):
    return ["train", DEMO, *TINY, *MESH, f"train.out_dir={out}", "train.steps=4", "loss.name=entropy_bonus",
            "train.only_mixed_groups=false", "train.tensorboard=true"]


def test_sigterm_writes_a_checkpoint_and_no_policy(cli_run, tmp_path, capsys):
    code, out, calls, err = cli_run
    assert code == cli.PREEMPTED_EXIT == 143
    assert calls == [0, 1]  # finished the step it was in, then stopped
    mgr = CheckpointManager(out / "checkpoints")
    assert mgr.latest_step() == 2
    mgr.close()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert not (out / "policy").exists()  # the run did not finish: no policy as if it had
    assert list((out / "tb").glob("events.*"))
    assert "\n" not in err and "SIGTERM" in err and "step 2" in err and "run the same command again" in err, err
    # ... and the same command resumes it to the end, then writes the policy (a console line every
    # train.log_every = 2 steps, and one for the last step).
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    capsys.readouterr()
    assert cli.main([*_cli_args(run), "train.log_every=2"]) == 0
    console = [line.split(" [")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert console == ["step 4/4"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "policy" / "config.json").exists()


def test_export_loads_in_transformers_with_matching_logits(cli_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from entrl.build import build_tokenizer
    from entrl.rl.setup import build_model
    from entrl.sharding import make_mesh

    _, run, _, _ = cli_run
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()

    # The policy of the latest checkpoint, on the export's own layout (so its init program is reused).
    cfg = C.from_dict(json.loads((run / "entrl_run.json").read_text()))
    tok = build_tokenizer(cfg)
    graphdef, init_params = build_model(cfg, make_mesh(data=1, fsdp=-1), tok)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), init_params)
    mgr = CheckpointManager(run / "checkpoints")
    trained = mgr.restore_latest(params_target=abstract).params
    mgr.close()
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    ids = np.asarray([tok.encode("12+7*3="), tok.encode("4*5-16=")], np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(trained, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # ... and it is the trained policy, not the initial one.
    init = np.asarray(forward(init_params, jnp.asarray(ids, jnp.int32)))
    assert np.abs(init - want).max() > 10 * max(np.abs(got - want).max(), 1e-5)


def _safetensors_dtypes(path):
    """{tensor name: dtype} from a safetensors header (8-byte little-endian length, then JSON)."""
    raw = Path(path).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_export_steps_dtypes_buckets_and_read_only(cli_run, tmp_path, capsys, fake_gcs):
    from etils import epath

    _, run, _, _ = cli_run
    # The default dtype is the source model's (float32 for the demo model); --dtype overrides it.
    assert cli.main(["export", str(run), "--out", str(tmp_path / "f32")]) == 0
    assert set(_safetensors_dtypes(tmp_path / "f32" / "model.safetensors").values()) == {"F32"}
    assert cli.main(["export", str(run), "--out", str(tmp_path / "bf16"), "--step", "2", "--dtype", "bfloat16"]) == 0
    assert set(_safetensors_dtypes(tmp_path / "bf16" / "model.safetensors").values()) == {"BF16"}
    # A step that is not kept: one line naming the kept ones.
    assert cli.main(["export", str(run), "--out", str(tmp_path / "x"), "--step", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no checkpoint of step 7" in err and "kept steps: 2" in err, err
    # A directory no export wrote (here a model: the user's base, another run's policy/) is never written
    # over, nor anything inside the run (its policy/ is the end of the run's); an earlier export is replaced
    # whole: no weight file of it lingers beside the new ones.
    foreign = tmp_path / "base_model"
    shutil.copytree(tmp_path / "f32", foreign)
    (foreign / "entrl_export.json").unlink()
    (foreign / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    for out, needle in ((foreign, "no `entrl export` wrote"), (run / "policy", "inside the run")):
        assert cli.main(["export", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    (tmp_path / "bf16" / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier export")
    (tmp_path / "bf16" / "chat_template.jinja").write_text("{{ stale }}")  # another tokenizer's file
    written = sorted(p.name for p in (tmp_path / "f32").iterdir())
    assert cli.main(["export", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir()) == written
    assert json.loads((tmp_path / "bf16" / "entrl_export.json").read_text())["dtype"] == "bfloat16"
    # gs:// output (in-memory fake of GCS): the same bytes as the local export.
    assert cli.main(["export", str(run), "--out", "gs://bucket/hf"]) == 0
    for name in ("model.safetensors", "config.json", "char_tokenizer.json"):
        assert epath.Path(f"gs://bucket/hf/{name}").read_bytes() == (tmp_path / "f32" / name).read_bytes()
    # Read-only: a run whose only checkpoint never committed cannot be exported, and nothing in it moves.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "2" / "commit_success.txt").unlink()
    before = sorted(str(p.relative_to(broken)) for p in broken.rglob("*"))
    assert cli.main(["export", str(broken), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no restorable checkpoint" in err, err
    assert sorted(str(p.relative_to(broken)) for p in broken.rglob("*")) == before


def test_model_path_accepts_a_run_directory(cli_run, tmp_path):
    """`model.path=<run dir>`: its policy/ when the run finished, else its latest checkpoint."""
    from entrl.build import build_mesh, build_tokenizer, resolve_model_dir
    from entrl.rl.setup import build_model

    _, run, _, _ = cli_run  # stopped by SIGTERM: no policy/, checkpoint of step 2
    cfg = make_cfg(tmp_path / "next", f"model.path={run}")
    mesh = build_mesh(cfg)
    graphdef, params = build_model(cfg, mesh, build_tokenizer(cfg))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    mgr = CheckpointManager(run / "checkpoints", read_only=True)
    saved = mgr.restore_latest(params_target=abstract)
    mgr.close()
    assert saved.step == 2
    assert_same_params(saved.params, params, tol=0)
    _, init = build_model(make_cfg(tmp_path / "next"), mesh, build_tokenizer(cfg))
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(init), jax.tree.leaves(params))) > 0

    finished = tmp_path / "finished"  # a run with policy/ (also one written before entrl_run.json existed)
    shutil.copytree(run, finished)
    assert cli.main(["export", str(finished), "--out", str(tmp_path / "hf")]) == 0
    shutil.copytree(tmp_path / "hf", finished / "policy")  # what the end of the run writes there
    assert resolve_model_dir(str(finished)) == finished / "policy"
    (finished / "entrl_run.json").rename(finished / "config.json")
    assert resolve_model_dir(str(finished)) == finished / "policy"


def test_plot_writes_pngs(cli_run, capsys):
    _, run, _, _ = cli_run
    assert cli.main(["plot", str(run)]) == 0
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == ["entropy.png", "response_length.png", "reward.png"]
    assert all((run / "plots" / p).stat().st_size > 1000 for p in pngs)


_COMPILES = []
_WATCH = [False]


def _on_event(event, duration, **kw):
    if _WATCH[0] and "compil" in event:
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _bad_jsonl(tmp_path):
    path = tmp_path / "no_answer.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": f"{i}+1"}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("case,overrides,needle", [
    ("missing model", ["model.path=/no/such/model"], "model.path"),
    ("no answer column", ["data.task=math", "data.train={jsonl}", "model.tokenizer=char"], "answer"),
    ("mesh vs devices", ["mesh.data=3", "mesh.tensor=1"], "mesh"),
    ("prompts vs data shards", ["mesh.data=8", "mesh.tensor=1"], "train.prompts_per_step"),
    ("micro-batch vs data shards", ["mesh.data=8", "mesh.tensor=1", "train.prompts_per_step=8",
                                    "train.minibatch_prompts=8", "train.microbatch_per_shard=8"],
     "train.microbatch_per_shard"),
    ("sampler slots vs data shards", ["rollout.slots=6"], "rollout.slots"),
    # more slots than a step's rows: the annotation's and evaluation's calls can still have more rows than that
    ("whole-step slots vs data shards", ["rollout.slots=1002"], "rollout.slots=1002 must be a multiple"),
    ("renamed key", ["train.microbatch_seqs=4"], "train.microbatch_per_shard"),
])
def test_bad_input_fails_before_any_compile(tmp_path, capsys, case, overrides, needle):
    overrides = [o.replace("{jsonl}", str(_bad_jsonl(tmp_path))) for o in overrides]
    _COMPILES.clear()
    _WATCH[0] = True
    try:
        code = cli.main(["train", DEMO, *TINY, *MESH, f"train.out_dir={tmp_path / 'run'}", *overrides])
    finally:
        _WATCH[0] = False
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("entrl: config error:") and "\n" not in err and needle in err, err
    assert not _COMPILES, f"{case}: compiled before failing"

# Multi-process runs (training, annotation, evaluation, export, kill and resume): tests/test_multihost.py

