"""entrl.ablate: the paper's comparison design (methods = loss + curriculum), the seed statistics, and the
entropy-collapse ablation (configs/collapse.yaml) at its --quick size."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from entrl import config as C
from entrl.ablate import ci95, curriculum_label, format_ablation, method_overrides, resolve
from entrl.cli import main
from entrl.methods import DEFAULT_METHODS, METHODS

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "paper" / "r1-distill-qwen-1.5b" / "sent.yaml"  # its own curriculum is on
BASELINES = ("grpo", "entropy_bonus", "entropy_adv", "high_entropy_mask", "clip_cov", "kl_cov", "kl_cov_verl")


@pytest.mark.parametrize("config", [PAPER, REPO / "configs" / "demo.yaml", REPO / "configs" / "collapse.yaml"])
def test_baselines_resolve_without_the_curriculum(config, tmp_path):
    """Whatever the config says about the curriculum, the baselines train on shuffled epochs and SENT on
    the low -> high SE curriculum (the paper's and the released scripts' design)."""
    for name in BASELINES:
        cfg = resolve(config, name, seed=1, out_dir=tmp_path / name)
        assert cfg.loss.name == name and not cfg.curriculum.enabled, name
        assert curriculum_label(cfg) == "off" and cfg.train.seed == 1
    for name, loss, order in [("sent", "sent", "low_to_high"), ("sent_released", "sent_released", "low_to_high"),
                              ("high_en", "high_en", "low_to_high"), ("sent_curriculum_only", "grpo", "low_to_high"),
                              ("sent_high_to_low", "sent", "high_to_low"), ("sent_random_order", "sent", "random")]:
        cfg = resolve(config, name, out_dir=tmp_path / name)
        assert (cfg.loss.name, cfg.curriculum.enabled, cfg.curriculum.order) == (loss, True, order), name
    cfg = resolve(config, "sent_token_only", out_dir=tmp_path / "t")
    assert (cfg.loss.name, cfg.curriculum.enabled) == ("sent", False)
    released = resolve(config, "sent_released", out_dir=tmp_path / "r")
    # the release's selection per 4 sequences of a shard, whatever the memory micro-batch
    assert C.selection_scope(released, shards=1) == ("microbatch", 4)
    assert C.selection_scope(resolve(config, "sent", out_dir=tmp_path / "s"), shards=1) == ("global", 0)


def test_every_loss_is_a_method_and_the_default_columns_are_the_papers():
    from entrl.rl.loss_specs import LOSSES

    assert all(METHODS[name].loss == name for name in LOSSES)  # `entrl ablate --methods <loss>` runs each loss
    assert DEFAULT_METHODS == ("grpo", "entropy_bonus", "entropy_adv", "high_entropy_mask", "clip_cov", "kl_cov",
                               "high_en", "sent")


def test_method_table_and_refusals(tmp_path, capsys):
    assert set(BASELINES) <= set(METHODS) and all(METHODS[b].curriculum == "off" for b in BASELINES)
    assert method_overrides("grpo") == ["loss.name=grpo", "curriculum.enabled=false"]
    for args, needle in [(["--methods", "grpo,snet"], "unknown methods ['snet']"),
                         (["--methods", "grpo,grpo"], "twice"),
                         (["--methods", "grpo", "curriculum.enabled=true"], "curriculum.enabled"),
                         (["--losses", "grpo", "loss.name=sent"], "loss.name")]:
        code = main(["ablate", str(PAPER), "--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("entrl: config error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_ci95_and_table():
    mean, half = ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)
    assert math.isnan(ci95([0.5])[1]) and math.isnan(ci95([])[0])
    rows = [{"method": "grpo", "loss": "grpo", "curriculum": "off", "seed": s, "pass@1": p, "pass@k": 0.8,
             "k": 16, "final_entropy": 0.05, "min_entropy": 0.04, "wall_s": 10.0} for s, p in enumerate([0.5, 0.6, 0.7])]
    table = format_ablation(rows)
    line = next(line for line in table.splitlines() if line.startswith("| grpo"))
    assert "| off " in line and "0.600 ± 0.248" in line and "pass@16" in table and "Student t" in table
    old = [{"loss": "sent", "seed": 0, "pass@1": 0.5, "pass@k": np.nan, "final_entropy": 0.1, "min_entropy": 0.1,
            "wall_s": 3.0}]  # a result.json of an older entrl: grouped by loss, no curriculum column value
    assert "| sent " in format_ablation(old)


def test_collapse_ablation_quick(tmp_path):
    """`entrl ablate configs/collapse.yaml --quick`: one shared warm start (warmstart.seed), one RL run per
    (seed, method) with accuracy-vs-step evaluations, the table with CIs, and the per-method curves."""
    out = tmp_path / "collapse"
    assert main(["ablate", str(REPO / "configs" / "collapse.yaml"), "--quick", "--methods", "grpo,sent",
                 "--seeds", "0,1", "--out", str(out), "train.eval_every=1"]) == 0
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("grpo", 0), ("sent", 0), ("grpo", 1), ("sent", 1)]
    assert (out / "base" / "warmstart" / "config.json").exists() and not (out / "seed0" / "warmstart").exists()
    assert len({r["before_pass@1"] for r in rows}) == 1  # one base model, one held-out set, for every seed
    for r in rows:
        from entrl.metrics import read_metrics

        hist = read_metrics(r["run_dir"])
        evals = [m["step"] for m in hist if "eval/pass@2" in m]
        assert evals == [0, 1, 2] == [0, *range(1, r["steps"] + 1)]  # the base model's point, then every step
        assert all("eval/entropy" in m for m in hist if "eval/pass@2" in m)  # val.entropy in collapse.yaml
        assert r["curriculum"] == ("off" if r["method"] == "grpo" else "low->high SE, 2 stages")
    table = (out / "ablation.md").read_text()
    assert "± " in table and "pass@2" in table
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"entropy_by_method.png", "eval_entropy_by_method.png", "eval_pass@2_by_method.png",
            "eval_pass@1_by_method.png", "eval.png"} <= plots
