"""`entrl plan`: memory plans from the compiled programs, targets, exit codes, and train's memory check.

Small configs on the 8 test devices (the demo model at demo sizes); the paper presets on their suggested
meshes are planned in tests/test_presets.py.
"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from entrl import cli
from entrl import config as C
from entrl import plan as P

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
SMALL = ["model.demo_layers=2", "model.demo_hidden=64", "model.demo_heads=4", "rollout.n=4",
         "rollout.max_new_tokens=64", "rollout.prompt_buckets=[16]", "data.max_prompt_len=16",
         "train.prompts_per_step=8", "train.minibatch_prompts=4", "mesh.data=4", "mesh.tensor=2",
         "data.arithmetic_train_size=64", "loss.kl_coef=0.001", "curriculum.samples=4"]  # SE: the rollout's program


def test_targets_and_suggestions():
    assert P.parse_target("tpu-v5p-8") == P.Target("tpu-v5p", 4)  # v5p names count TensorCores
    assert P.parse_target("v5e-16") == P.Target("tpu-v5e", 16)
    assert P.parse_target("8xH100") == P.Target("h100", 8)
    assert P.parse_target("a100-80gb").hbm_bytes == 80 * P.GIB
    for bad in ("v5p-7", "tpu-v9-8", "8xb200"):
        with pytest.raises(C.ConfigError):
            P.parse_target(bad)
    found = P.mesh_suggestions(REPO / "configs" / "paper" / "r1-distill-qwen-1.5b" / "sent.yaml")
    assert len(found) >= 2 and {t.kind for _, t, _ in found} >= {"tpu-v5p", "h100"}
    for label, target, overrides in found:
        assert [o.split("=")[0] for o in overrides][:3] == ["mesh.data", "mesh.fsdp", "mesh.tensor"], label
        sizes = [int(o.split("=")[1]) for o in overrides[:3]]
        assert int(np.prod(sizes)) == target.devices, label


@pytest.fixture(scope="module")
def small_plan():
    cfg = C.load_config(DEMO, SMALL)
    return cfg, P.plan_run(cfg, budget_bytes=P.GIB, budget_source="test")


def test_plan_accounts_state_and_phases(small_plan):
    cfg, plan = small_plan
    per = plan.per_device_bytes
    assert set(per) == {"params", "optimizer", "reference", "update_peak", "logprob_peak", "rollout_peak"}
    # float32 params split over the mesh; AdamW holds two moments of the same layout (+ two counters)
    mcfg = P.model_config(cfg)
    assert per["params"] >= mcfg.num_params() * 4 / 8 and per["params"] <= mcfg.num_params() * 4
    assert 2 * per["params"] <= per["optimizer"] <= 2 * per["params"] + 64
    assert per["reference"] == per["params"]  # float32 compute: a float32 copy
    resident = per["params"] + per["optimizer"] + per["reference"]
    # the SE annotation (curriculum.samples = rollout.n = 4) is the rollout's own program; with 8 samples
    # per prompt it is a phase of its own, before the optimizer state exists
    assert "annotate" not in plan.programs
    own = P.plan_run(C.replace(cfg, **{"curriculum.samples": 8}), budget_bytes=P.GIB, only=("annotate",))
    assert own.per_device_bytes["annotate_peak"] > per["params"] + per["reference"]
    assert "annotate (when the training data lacks se): 8 prompts x 8 samples per sampler call" in own.notes
    for phase in ("update_peak", "logprob_peak", "rollout_peak"):
        assert per[phase] > resident, phase
    assert plan.fits and plan.peak_bytes == max(per[k] for k in per if k.endswith("_peak"))
    assert plan.tokens_per_step == {"rows": 32, "prompt": 32 * 16, "response": 32 * 64}
    assert plan.steps_per_stage == [64 // 2 // 8] * 2  # two equal SE stages of 32 prompts, 8 per step
    assert "DOES NOT FIT" not in plan.table() and "update peak" in plan.table()


def test_a_recorded_analysis_gives_the_compiled_plan_without_compiling(small_plan, monkeypatch):
    """compile=False reads the memory of a program from `RECORDED` when its lowered text's hash is there
    (what tests/test_presets.py does for the paper presets); a program not recorded is unknown, not 0 bytes
    of a fit."""
    cfg, compiled = small_plan
    lowered = P.plan_run(cfg, budget_bytes=P.GIB, compile=False)
    assert not any(v["known"] for v in lowered.programs.values())
    assert lowered.per_device_bytes["update_peak"] < compiled.per_device_bytes["update_peak"]
    monkeypatch.setattr(P, "RECORDED", {v["key"]: (v["arguments"], v["outputs"], v["aliased"], v["temporaries"])
                                        for v in compiled.programs.values()})
    recorded = P.plan_run(cfg, budget_bytes=P.GIB, compile=False)
    assert all(v["known"] for v in recorded.programs.values())
    assert recorded.per_device_bytes == compiled.per_device_bytes and recorded.fits
    other = P.plan_run(C.replace(cfg, **{"rollout.max_new_tokens": 32}), compile=False, only=("rollout",))
    assert not other.programs["rollout"]["known"]  # another program text: no recorded analysis applies


def test_the_periodic_evaluation_is_planned_from_val(small_plan):
    """train.eval_every's sampler is the trainer's: val.n samples, val.max_new_tokens (else the rollout's
    budget), a rollout call's rows; entrl eval's settings (eval.*) do not enter it."""
    cfg, plan = small_plan
    on = C.replace(cfg, **{"train.eval_every": 2, "val.n": 2})
    key = lambda c: P.plan_run(c, compile=False, only=("eval",)).programs["eval"]["key"]  # noqa: E731
    assert key(C.replace(on, **{"eval.n": 8, "eval.max_new_tokens": 999})) == key(on)
    assert key(C.replace(on, **{"val.max_new_tokens": 32})) != key(on)
    evaluated = P.plan_run(on, budget_bytes=P.GIB, only=("eval",))
    assert "eval (val.*): 16 problems x 2 samples x 64 new tokens per sampler call" in evaluated.notes
    resident = sum(plan.per_device_bytes[k] for k in ("params", "optimizer", "reference"))
    assert evaluated.per_device_bytes["eval_peak"] > resident
    # val.entropy: one more forward over a call's rows, in the training log-prob phase's micro-batches
    assert "eval_entropy" in P.plan_run(C.replace(on, **{"val.entropy": True}), compile=False,
                                        only=("eval",)).programs
    from entrl.evaluation import entropy_micro_batches

    assert [entropy_micro_batches(64, 4, p) for p in (0, 16, 99, 5, 4, 1)] == [1, 1, 1, 4, 4, 16]


def test_bf16_compute_halves_the_reference_and_remat_shrinks_the_update(small_plan):
    cfg, base = small_plan
    bf16 = P.plan_run(C.replace(cfg, **{"model.dtype": "bfloat16"}), only=())  # resident state: no program
    assert bf16.per_device_bytes["params"] == base.per_device_bytes["params"]  # float32 masters either way
    assert bf16.per_device_bytes["reference"] * 2 == base.per_device_bytes["reference"]
    long = C.replace(cfg, **{"rollout.max_new_tokens": 256, "train.microbatch_per_shard": 4})
    peak = {r: P.plan_run(C.replace(long, **{"model.remat": r}), only=("update",)).per_device_bytes["update_peak"]
            for r in ("none", "full")}
    assert peak["full"] < peak["none"], peak


def test_plan_cli_json_exit_codes_and_one_line_errors(capsys):
    assert cli.main(["plan", DEMO, *SMALL, "--hbm-gb", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and set(out["per_device_bytes"]) >= {"params", "optimizer", "update_peak",
                                                                    "rollout_peak"}
    assert cli.main(["plan", DEMO, *SMALL, "--hbm-gb", "0.001"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    for bad, needle in ((["mesh.data=3"], "mesh"), (["--target", "v5p-7"], "whole chips"), ([], "no memory budget")):
        args = ["plan", DEMO, *SMALL, *bad] + ([] if "--target" in bad or bad == [] else ["--hbm-gb", "4"])
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("entrl: config error:") and "\n" not in err and needle in err, err
    # the flags themselves, refused before anything is built
    for bad, needle in ((["--hbm-gb", "nan"], "--hbm-gb"), (["--hbm-gb", "0"], "--hbm-gb"),
                        (["--hbm-gb", "4", "--devices", "-2"], "--devices"), (["--hbm-gb", "4", "--devices", "0"],
                                                                              "--devices"),
                        (["--hbm-gb", "4", "--headroom", "1.5"], "--headroom"),
                        (["--devices", "4"], "no memory budget for 4 simulated")):
        assert cli.main(["plan", DEMO, *SMALL, *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("entrl: config error:") and "\n" not in err and needle in err, err


def test_plan_simulates_another_device_count(capsys):
    """--devices 4 from a process holding 8 devices: the plan runs in a subprocess on 4 simulated CPUs."""
    assert jax.device_count() == 8
    assert cli.main(["plan", DEMO, *SMALL, "mesh.data=2", "--devices", "4", "--hbm-gb", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 4 and out["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}


def test_eval_plan_and_auto_batch():
    cfg = C.load_config(DEMO, [*SMALL, "eval.n=4", "eval.max_new_tokens=128"])
    small = P.plan_eval(cfg, batch_problems=2)
    big = P.plan_eval(cfg, batch_problems=16)
    assert big.per_device_bytes["eval_peak"] > small.per_device_bytes["eval_peak"]
    budget = (small.per_device_bytes["eval_peak"] + big.per_device_bytes["eval_peak"]) // 2
    batch = P.auto_eval_batch(cfg, int(budget / (1 - P.DEFAULT_HEADROOM)))
    assert 2 <= batch < 16  # between the two probes (4 samples per problem split over 4 data shards at any size)
    assert P.plan_eval(cfg, budget_bytes=int(budget / (1 - P.DEFAULT_HEADROOM)), batch_problems=batch).fits


def test_train_refuses_a_run_that_cannot_fit(tmp_path, monkeypatch, capsys):
    import entrl.plan

    monkeypatch.setattr(entrl.plan, "device_budget", lambda: (1 << 20, "a 1 MiB test device"))
    code = cli.main(["train", DEMO, *SMALL, f"train.out_dir={tmp_path / 'run'}", "train.steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("entrl: config error: the run needs") and "\n" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    from entrl.rl.setup import _MEMORY_KNOBS, check_memory

    worst = re.search(r"per device \((\w+_peak)\)", err).group(1)
    assert _MEMORY_KNOBS[worst] in err  # what lowers that phase's peak, not every knob there is

    check_memory(C.load_config(DEMO, [*SMALL, "train.memory_check=false"]))  # opted out: no plan, no refusal
    monkeypatch.setattr(entrl.plan, "device_budget", lambda: (None, "cpu"))
    check_memory(C.load_config(DEMO, SMALL))  # no budget known (CPU): nothing to check against


def test_the_annotation_is_planned_only_when_the_run_annotates():
    """`entrl plan` does not read the data: it plans the SE annotation (curriculum.samples != rollout.n);
    `entrl train` knows whether the data has the SE column and plans it only when it will run."""
    from entrl.data.sources import Record
    from entrl.rl.setup import will_annotate

    cfg = C.load_config(DEMO, [*SMALL, "curriculum.samples=8"])
    assert "annotate_peak" in P.plan_run(cfg, compile=False, only=("annotate",)).per_device_bytes
    skipped = P.plan_run(cfg, compile=False, only=("annotate",), annotates=False)
    assert "annotate_peak" not in skipped.per_device_bytes and "annotate" not in skipped.programs
    with_se = [Record(id="a", problem="1+1", answer="2", extra={"se": 0.3})]
    assert not will_annotate(cfg, with_se)
    assert will_annotate(cfg, [*with_se, Record(id="b", problem="1+2", answer="3")])
    assert not will_annotate(C.replace(cfg, **{"curriculum.enabled": False}), [Record(id="b", problem="1", answer="1")])

