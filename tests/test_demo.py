"""The README's main command (`entrl demo`) and `entrl ablate demo`, at their --quick sizes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from entrl.cli import main
from entrl.demo import paired_ci


def test_paired_ci_by_hand():
    before = np.array([0.0, 0.5, 0.5, 1.0])
    after = np.array([0.5, 0.5, 1.0, 1.0])
    gain, lo, hi = paired_ci(before, after)
    d = after - before  # 0.5, 0, 0.5, 0 -> mean 0.25, sd 0.2887
    half = 1.96 * d.std(ddof=1) / 2
    assert gain == 0.25 and np.isclose(lo, 0.25 - half) and np.isclose(hi, 0.25 + half)


def test_demo_quick_writes_summary_checkpoint_and_plots(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    problems, n = s["heldout_problems"], s["samples_per_problem"]
    assert (problems, n, s["k"]) == (32, 2, 2)  # demo.QUICK's held-out set
    for side in ("before", "after"):
        assert set(s[side]) >= {"pass@1", "pass@k", "entropy"}
        # counts over the whole held-out set: pass@1 of `n` samples per problem, pass@k (k = n) of problems
        assert s[side]["pass@1"] * problems * n == pytest.approx(round(s[side]["pass@1"] * problems * n))
        assert s[side]["pass@k"] * problems == pytest.approx(round(s[side]["pass@k"] * problems))
        assert s[side]["pass@k"] == s[side]["pass@2"]
    # the paired gain is the difference of the two means, and its normal interval is centred on it
    lo, hi = s["pass@1_gain_ci95"]
    assert s["pass@1_gain"] == pytest.approx(s["after"]["pass@1"] - s["before"]["pass@1"])
    assert hi - s["pass@1_gain"] == pytest.approx(s["pass@1_gain"] - lo)
    assert s["wall_seconds"] > 0
    assert (out / "rl" / "policy" / "config.json").exists()
    assert (out / "warmstart" / "char_tokenizer.json").exists()
    assert list((out / "rl" / "checkpoints").iterdir())
    assert (out / "rl" / "metrics.jsonl").read_text().count("\n") == s["rl_steps"]
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())


def test_ablate_demo_quick_table(tmp_path, capsys):
    """The paper's design: grpo trains without the SE curriculum, sent and the curriculum-only ablation with
    it (one annotation, shared); the table says which column used it."""
    out = tmp_path / "ablate"
    methods = "grpo,sent,sent_curriculum_only"
    assert main(["ablate", "demo", "--quick", "--methods", methods, "--out", str(out)]) == 0
    table = (out / "ablation.md").read_text()
    assert "| grpo " in table and "| sent " in table and "pass@1" in table and "curriculum" in table
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["method"] for r in rows] == ["grpo", "sent", "sent_curriculum_only"]
    assert [r["loss"] for r in rows] == ["grpo", "sent", "grpo"]
    assert [r["curriculum"] for r in rows] == ["off", "low->high SE, 2 stages", "low->high SE, 2 stages"]
    grpo_line = next(line for line in table.splitlines() if line.startswith("| grpo "))
    assert "| off " in grpo_line
    # grpo never annotated; the curriculum runs share one annotation of the same warm start.
    assert not (out / "seed0" / "grpo" / "semantic_entropy.jsonl").exists()
    se = [(out / "seed0" / m / "semantic_entropy.jsonl").read_text() for m in ("sent", "sent_curriculum_only")]
    assert se[0] == se[1] and se[0]
    # Resuming the ablation reuses finished runs (nothing retrained).
    assert main(["ablate", "demo", "--quick", "--methods", methods, "--out", str(out)]) == 0
    assert json.loads((out / "ablation.json").read_text()) == rows
    assert "| grpo " in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_portable_cpu_caps_the_isa_and_pins_one_core():
    """`entrl --portable-cpu`: set before JAX starts, visible to XLA (one core, AVX2), and JAX still computes."""
    code = ("import os; from entrl.cli import portable_cpu; portable_cpu(); import jax, jax.numpy as jnp; "
            "print(len(os.sched_getaffinity(0)), os.environ['XLA_FLAGS'], float(jnp.arange(4.0).sum()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cores, flags, total = out.stdout.split()
    assert cores == "1" and flags == "--xla_cpu_max_isa=AVX2" and total == "6.0"


def test_the_demo_evaluates_with_the_eval_sampling_settings():
    """The before/after evaluation samples as `eval.*` says (n, temperature, top_p, top_k), within the rollout's
    response budget (eval.max_new_tokens is the benchmarks' 8,000, past the demo model's context)."""
    from entrl import config as C
    from entrl.demo import _eval_sampler
    from entrl.tokenizer import CharTokenizer

    cfg = C.load_config("demo", ["eval.n=3", "eval.k=[1, 3]", "eval.temperature=0.5", "eval.top_p=0.9", "eval.top_k=5"])
    sc = _eval_sampler(cfg, CharTokenizer()).config
    assert (sc.n, sc.temperature, sc.top_p, sc.top_k) == (3, 0.5, 0.9, 5)
    assert sc.max_new_tokens == cfg.rollout.max_new_tokens
