"""`entrl ablate`: the same config and seed with each loss, then one table and one entropy plot.

Design decisions:
- Runs are sequential and independent: `<out>/seed<s>/<loss>/` is a normal run
  directory (metrics, checkpoints, policy), so any run can be resumed, plotted or
  exported on its own, and an interrupted ablation resumes run by run (finished
  runs, recognised by their `result.json`, are not repeated).
- With the embedded demo (`entrl ablate demo`), the warm start and the
  before-RL evaluation are done once per seed and shared by every loss, and the
  semantic-entropy annotation of the first run is reused by the others (it is the
  same policy, so the curriculum is identical across losses): only the RL differs.
- With a YAML config, "final accuracy" is the held-out pass@1 when the task has a
  held-out split, else the last periodic `eval/pass@1`, else the training
  accuracy of the last step (the column header says which).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from entrl import config as C

COLUMNS = ["loss", "seed", "pass@1", "pass@k", "final_entropy", "min_entropy", "wall_s"]


def _entropy_curve(run_dir: Path) -> list[float]:
    from entrl.metrics import read_metrics

    return [float(m["entropy"]) for m in read_metrics(run_dir) if m.get("entropy") is not None]


def _demo_runs(losses, seeds, overrides, out: Path, quick: bool = False) -> list[dict]:
    from entrl import demo

    rows = []
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        ctx = None
        se_cache = None
        try:
            for loss in losses:
                run_dir = seed_dir / loss
                done = run_dir / "result.json"
                if done.exists():
                    rows.append(json.loads(done.read_text()))
                    continue
                if ctx is None:
                    ctx = demo.prepare(seed_dir, seed=seed, quick=quick, overrides=overrides)
                if se_cache is not None and not (run_dir / "semantic_entropy.jsonl").exists():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(se_cache, run_dir / "semantic_entropy.jsonl")
                t0 = time.perf_counter()
                trainer, after = demo.rl_and_evaluate(ctx, run_dir, [f"loss.name={loss}"])
                se_cache = se_cache or (run_dir / "semantic_entropy.jsonl")
                curve = _entropy_curve(run_dir)
                k = ctx.cfg.eval.k[-1]
                row = {"loss": loss, "seed": seed, "pass@1": after["pass@1"], "pass@k": after[f"pass@{k}"],
                       "k": k, "before_pass@1": ctx.before["pass@1"],
                       "final_entropy": curve[-1] if curve else float("nan"),
                       "min_entropy": min(curve) if curve else float("nan"),
                       "eval_entropy": after["entropy"], "wall_s": time.perf_counter() - t0,
                       "run_dir": str(run_dir)}
                done.write_text(json.dumps(row, indent=2))
                rows.append(row)
        finally:
            if ctx is not None:
                ctx.close()
    return rows


def _config_runs(config: str, losses, seeds, overrides, out: Path) -> list[dict]:
    from entrl.metrics import read_metrics
    from entrl.rl.setup import train_from_config

    rows = []
    for seed in seeds:
        for loss in losses:
            run_dir = out / f"seed{seed}" / loss
            done = run_dir / "result.json"
            if done.exists():
                rows.append(json.loads(done.read_text()))
                continue
            cfg = C.load_config(config, [*overrides, f"loss.name={loss}", f"train.seed={seed}",
                                         f"train.out_dir={run_dir}"])
            t0 = time.perf_counter()
            trainer = train_from_config(cfg, resume=True)
            hist = read_metrics(run_dir)
            final = next((m["eval/pass@1"] for m in reversed(hist) if m.get("eval/pass@1") is not None), None)
            source = "eval/pass@1"
            if final is None:
                final, source = (hist[-1].get("accuracy", float("nan")) if hist else float("nan")), "train accuracy"
            curve = _entropy_curve(run_dir)
            row = {"loss": loss, "seed": seed, "pass@1": final, "pass@k": float("nan"), "accuracy_source": source,
                   "final_entropy": curve[-1] if curve else float("nan"),
                   "min_entropy": min(curve) if curve else float("nan"),
                   "wall_s": time.perf_counter() - t0, "steps": trainer.step, "run_dir": str(run_dir)}
            done.write_text(json.dumps(row, indent=2))
            rows.append(row)
    return rows


def format_ablation(rows: list[dict]) -> str:
    """Markdown table: one line per loss, mean (and +- std over seeds when there are several)."""
    from entrl.metrics import markdown_table

    by_loss: dict[str, list[dict]] = {}
    for r in rows:
        by_loss.setdefault(r["loss"], []).append(r)
    k = rows[0].get("k", "k") if rows else "k"
    table = []
    for loss, rs in by_loss.items():
        def stat(key, fmt="{:.3f}"):
            vals = np.array([r[key] for r in rs], float)
            if len(vals) > 1:
                return (fmt + " ± " + fmt).format(np.nanmean(vals), np.nanstd(vals, ddof=1))
            return fmt.format(vals[0])

        table.append({"loss": loss, "seeds": len(rs), "held-out pass@1": stat("pass@1"),
                      f"pass@{k}": stat("pass@k"), "final entropy": stat("final_entropy"),
                      "min entropy": stat("min_entropy"), "wall s": stat("wall_s", "{:.0f}")})
    cols = ["loss", "seeds", "held-out pass@1", f"pass@{k}", "final entropy", "min entropy", "wall s"]
    header = ""
    if rows and "before_pass@1" in rows[0]:
        header = f"warm-start (before RL) pass@1: {np.mean([r['before_pass@1'] for r in rows]):.3f}\n\n"
    return header + markdown_table(table, cols)


def run_ablation(config: str, losses: list[str], seeds: list[int], *, overrides=(), out_dir: str = "ablate_out",
                 demo: bool = False, quick: bool = False) -> str:
    """Run every (seed, loss), write `<out>/ablation.md`, `<out>/ablation.json` and `<out>/entropy.png`."""
    from entrl.metrics import plot_runs
    from entrl.rl.losses import PRESETS

    unknown = [name for name in losses if name not in PRESETS]
    if unknown:
        raise C.ConfigError(f"unknown loss names {unknown}; valid: {', '.join(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if demo or config == "demo":
        rows = _demo_runs(losses, seeds, list(overrides), out, quick=quick)
    else:
        rows = _config_runs(config, losses, seeds, list(overrides), out)
    table = format_ablation(rows)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    plot_runs([r["run_dir"] for r in rows], out / "plots", labels=[f"{r['loss']} s{r['seed']}" for r in rows])
    return table
