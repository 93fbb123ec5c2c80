"""The README's main command (`entrl demo`) and `entrl ablate demo`, at their --quick sizes."""

import json

import numpy as np

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
    for side in ("before", "after"):
        assert set(s[side]) >= {"pass@1", "pass@k", "entropy"}
        assert 0.0 <= s[side]["pass@1"] <= 1.0 and 0.0 <= s[side]["pass@k"] <= 1.0
        assert s[side]["pass@k"] >= s[side]["pass@1"] - 1e-9
    lo, hi = s["pass@1_gain_ci95"]
    assert lo <= s["pass@1_gain"] <= hi and s["wall_seconds"] > 0 and s["k"] == 2
    assert (out / "rl" / "policy" / "config.json").exists()
    assert (out / "warmstart" / "char_tokenizer.json").exists()
    assert list((out / "rl" / "checkpoints").iterdir())
    assert (out / "rl" / "metrics.jsonl").read_text().count("\n") == s["rl_steps"]
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())


def test_ablate_demo_quick_table(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "demo", "--quick", "--losses", "grpo,sent", "--out", str(out)]) == 0
    table = (out / "ablation.md").read_text()
    assert "| grpo |" in table and "| sent |" in table and "held-out pass@1" in table
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["loss"] for r in rows] == ["grpo", "sent"]
    # Both losses started from the same warm start and the same SE curriculum.
    se = [(out / "seed0" / r["loss"] / "semantic_entropy.jsonl").read_text() for r in rows]
    assert se[0] == se[1]
    # Resuming the ablation reuses finished runs (nothing retrained).
    assert main(["ablate", "demo", "--quick", "--losses", "grpo,sent", "--out", str(out)]) == 0
    assert json.loads((out / "ablation.json").read_text()) == rows
    assert "| grpo |" in capsys.readouterr().out
