"""`entrl ablate`: one config, several methods and seeds, then one table and the curves per method.

Design decisions:
- A *method* is a column of the paper's comparison: a loss plus whether (and in which order) the
  semantic-entropy curriculum is used (`entrl.methods.METHODS`). As in the paper and its released scripts, the
  baselines (GRPO and the entropy methods) train on plain shuffled epochs, SENT on its curriculum;
  the component ablations are methods too (token loss only, curriculum only, and the stage order).
  The method decides `loss.name`, `curriculum.enabled` and `curriculum.order`; giving those on the
  command line is refused, because a column would no longer be what its name says. Every other key
  comes from the config and the command line, identically for every method.
- Runs are sequential and independent: `<out>/seed<s>/<method>/` is a normal run directory
  (metrics, checkpoints, policy), so any run can be resumed, plotted or exported on its own, and an
  interrupted ablation resumes run by run (finished runs, recognised by their `result.json`, are not
  repeated).
- Configs that warm-start the demo model (`entrl ablate demo`, or any config with
  `warmstart.enabled`, e.g. configs/collapse.yaml) go through the demo pipeline: the warm start and
  the before-RL evaluation are done once per seed (once for all seeds with a fixed `warmstart.seed`:
  one base model, like the paper's one pretrained model, and one held-out set) and shared by every
  method, and the SE annotation of the first curriculum method of a seed is reused by the others
  (same policy, same prompts, same seed, so the same values): only the RL differs. Their final
  numbers are the held-out pass@1 / pass@k of `eval.n` samples per problem.
- With another YAML config the final accuracy is the last periodic `eval/pass@1` (`train.eval_every`,
  `val`), else the training accuracy of the last step (the `accuracy from` column says which).
- Seeds are summarised as mean ± the half-width of a 95% confidence interval (Student t with n - 1
  degrees of freedom): with 3 seeds that is 4.30 standard errors, honest about how little 3 runs say.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from entrl import config as C
from entrl.demo import DEMO_YAML, rl_and_evaluate
from entrl.demo import prepare as prepare_demo
from entrl.methods import METHODS
from entrl.metrics import markdown_table, plot_mean_curves, plot_runs, read_metrics
from entrl.rl.setup import train_from_config

_METHOD_KEYS = ("loss.name", "curriculum.enabled", "curriculum.order")


def method_overrides(name: str) -> list[str]:
    """The dotted overrides that make a config run method `name`."""
    m = METHODS[name]
    out = [f"loss.name={m.loss}"]
    if m.curriculum == "off":
        out.append("curriculum.enabled=false")
    else:
        out += ["curriculum.enabled=true", f"curriculum.order={m.curriculum}"]
    out += list(m.overrides)
    return out


def check_methods(methods, overrides) -> None:
    """ConfigError for unknown methods, or command-line overrides of what the methods decide."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise C.ConfigError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise C.ConfigError(f"methods {list(methods)} name one method twice")
    keys = {o.split("=", 1)[0].strip() for o in C.expand_aliases(list(overrides))[0]}  # TRL / verl names too
    clash = sorted(keys & set(_METHOD_KEYS))
    if clash:
        raise C.ConfigError(f"{', '.join(clash)}: each method sets these (grpo: no curriculum, sent: curriculum low "
                            "to high, ...); choose methods instead (see `entrl ablate --help`)")
    for key, flag in (("train.seed", "--seeds"), ("train.out_dir", "--out")):
        if key in keys:  # each run's own: the override would be dropped
            raise C.ConfigError(f"{key}: entrl ablate sets it for every run; use {flag}")


def resolve(config, method: str, overrides=(), *, seed: int = 0, out_dir: str | Path = "ablate_out") -> C.RunConfig:
    """The run config of one (method, seed) of a YAML ablation."""
    tail = [*overrides, f"train.seed={seed}", f"train.out_dir={out_dir}"]
    return C.load_config(config, [*method_overrides(method), *tail])


def curriculum_label(cfg: C.RunConfig) -> str:
    cur = cfg.curriculum
    if not cur.enabled:
        return "off"
    stages = "continuous" if cur.mode == "continuous" else f"{len(cur.thresholds) + 1 if cur.thresholds else cur.stages} stages"
    arrow = {"low_to_high": "low->high SE", "high_to_low": "high->low SE", "random": "random stages"}[cur.order]
    return f"{arrow}, {stages}"


def _uses_se(name: str, cfg: C.RunConfig) -> bool:
    """Whether method `name` on `cfg` reads the semantic-entropy annotation."""
    order = METHODS[name].curriculum
    return order != "off" and (order != "random" or cfg.curriculum.drop_trivial)


def _finished_annotation(seed_dir: Path) -> Path | None:
    """The SE annotation of a finished curriculum run of this seed (the same for every method), if any."""
    return next((p for p in sorted(seed_dir.glob("*/semantic_entropy.jsonl")) if (p.parent / "result.json").exists()
                 and json.loads((p.parent / "result.json").read_text()).get("uses_se")), None)


def _entropy_curve(run_dir: Path) -> list[float]:
    return [float(m["entropy"]) for m in read_metrics(run_dir) if m.get("entropy") is not None]


def _curve_stats(run_dir: Path) -> dict:
    """Rollout entropy of a run: mean of its first and of its last 10% of steps (one step is noisy), minimum."""
    curve = _entropy_curve(run_dir)
    if not curve:
        return {"first_entropy": float("nan"), "final_entropy": float("nan"), "min_entropy": float("nan")}
    tail = max(1, len(curve) // 10)
    return {"first_entropy": float(np.mean(curve[:tail])), "final_entropy": float(np.mean(curve[-tail:])),
            "min_entropy": min(curve)}


def _warm_runs(config, methods, seeds, overrides, out: Path, quick: bool = False) -> list[dict]:
    base = DEMO_YAML if config == "demo" else config
    shared_seed = C.load_config(base, overrides).warmstart.seed  # >= 0: one base model for every seed
    rows = []
    ctx = None
    try:
        for seed in seeds:
            seed_dir = out / f"seed{seed}"
            se_cache = None
            if ctx is not None and shared_seed < 0:
                ctx.close()
                ctx = None
            for name in methods:
                run_dir = seed_dir / name
                done = run_dir / "result.json"
                if done.exists():
                    rows.append(json.loads(done.read_text()))
                    continue
                if ctx is None and shared_seed >= 0:  # the base model of every seed, and its evaluation
                    ctx = prepare_demo(out / "base", seed=shared_seed, quick=quick, overrides=overrides, base=base)
                elif ctx is None:
                    ctx = prepare_demo(seed_dir, seed=seed, quick=quick, overrides=overrides, base=base)
                rl = [f"train.seed={seed}", f"curriculum.seed={seed}", *method_overrides(name)]
                if se_cache is None:  # a finished curriculum run of this seed holds the annotation
                    se_cache = _finished_annotation(seed_dir)
                if _uses_se(name, ctx.cfg) and se_cache is not None and not (run_dir / "semantic_entropy.jsonl").exists():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(se_cache, run_dir / "semantic_entropy.jsonl")
                t0 = time.perf_counter()
                trainer, after = rl_and_evaluate(ctx, run_dir, rl)
                if _uses_se(name, ctx.cfg) and (run_dir / "semantic_entropy.jsonl").exists():
                    se_cache = se_cache or (run_dir / "semantic_entropy.jsonl")
                ks = tuple(ctx.cfg.eval.k)
                k = ks[-1]
                row = {"method": name, "loss": trainer.cfg.loss.name, "curriculum": curriculum_label(trainer.cfg),
                       "seed": seed, "pass@1": after["pass@1"], "pass@k": after[f"pass@{k}"], "k": k,
                       "heldout": {f"{m}@{j}": after[f"{m}@{j}"] for m in ("pass", "avg") for j in ks},
                       "before_pass@1": ctx.before["pass@1"], "before_pass@k": ctx.before[f"pass@{k}"],
                       "before_entropy": ctx.before["entropy"], **_curve_stats(run_dir),
                       "eval_entropy": after["entropy"], "wall_s": time.perf_counter() - t0,
                       "uses_se": _uses_se(name, ctx.cfg),
                       "steps": trainer.step, "run_dir": str(run_dir)}
                done.write_text(json.dumps(row, indent=2))
                rows.append(row)
    finally:
        if ctx is not None:
            ctx.close()
    return rows


def _config_runs(config: str, methods, seeds, overrides, out: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        se_cache = None
        for name in methods:
            run_dir = out / f"seed{seed}" / name
            done = run_dir / "result.json"
            if done.exists():
                rows.append(json.loads(done.read_text()))
                continue
            cfg = resolve(config, name, overrides, seed=seed, out_dir=run_dir)
            print(f"[ablate] seed {seed}, {name}: loss {cfg.loss.name}, curriculum {curriculum_label(cfg)}", flush=True)
            se_cache = se_cache or _finished_annotation(out / f"seed{seed}")
            if C.needs_semantic_entropy(cfg) and se_cache is not None and not (run_dir / "semantic_entropy.jsonl").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(se_cache, run_dir / "semantic_entropy.jsonl")
            t0 = time.perf_counter()
            trainer = train_from_config(cfg, resume=True)
            hist = read_metrics(run_dir)
            final = next((m["eval/pass@1"] for m in reversed(hist) if m.get("eval/pass@1") is not None), None)
            source = "eval/pass@1"
            if final is None:
                final, source = (hist[-1].get("accuracy", float("nan")) if hist else float("nan")), "train accuracy"
            k = max(cfg.val.k)
            final_k = next((m[f"eval/pass@{k}"] for m in reversed(hist) if m.get(f"eval/pass@{k}") is not None),
                           float("nan"))
            row = {"method": name, "loss": cfg.loss.name, "curriculum": curriculum_label(cfg), "seed": seed,
                   "pass@1": final, "pass@k": final_k, "k": k, "accuracy_source": source, **_curve_stats(run_dir),
                   "uses_se": C.needs_semantic_entropy(cfg),
                   "wall_s": time.perf_counter() - t0, "steps": trainer.step, "run_dir": str(run_dir)}
            done.write_text(json.dumps(row, indent=2))
            rows.append(row)
    return rows


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values) -> tuple[float, float]:
    """(mean, half-width of the 95% CI of the mean) over seeds, Student t; half-width nan for one value."""
    vals = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if vals.size == 0:
        return float("nan"), float("nan")
    if vals.size == 1:
        return float(vals[0]), float("nan")
    t = _T975.get(vals.size - 1, 1.96 + 2.5 / (vals.size - 1))  # beyond 10 dof: within 0.01 of t
    return float(vals.mean()), float(t * vals.std(ddof=1) / math.sqrt(vals.size))


def format_ablation(rows: list[dict]) -> str:
    """Markdown table: one line per method (runs grouped by method, else by loss), mean ± 95% CI over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("method", r["loss"]), []).append(r)
    k = rows[0].get("k", "k") if rows else "k"
    table = []
    def stat(rs, key, fmt="{:.3f}"):
        mean, half = ci95([r.get(key, float("nan")) for r in rs])
        return fmt.format(mean) if math.isnan(half) else (fmt + " ± " + fmt).format(mean, half)

    for name, rs in groups.items():
        table.append({"method": name, "loss": rs[0].get("loss", name), "curriculum": rs[0].get("curriculum", ""),
                      "seeds": len(rs), "pass@1": stat(rs, "pass@1"), f"pass@{k}": stat(rs, "pass@k"),
                      "first entropy": stat(rs, "first_entropy"), "final entropy": stat(rs, "final_entropy"),
                      "min entropy": stat(rs, "min_entropy"),
                      "held-out entropy": stat(rs, "eval_entropy"), "wall s": stat(rs, "wall_s", "{:.0f}")})
    cols = ["method", "loss", "curriculum", "seeds", "pass@1", f"pass@{k}", "first entropy", "final entropy",
            "min entropy", "held-out entropy", "wall s"]
    for col, key in (("first entropy", "first_entropy"), ("held-out entropy", "eval_entropy")):
        if not any(key in r for r in rows):
            cols.remove(col)
    header = ""
    if rows and "before_pass@1" in rows[0]:
        before = {key: ci95([r.get(key, float("nan")) for r in rows])[0] for key in
                  ("before_pass@1", "before_pass@k", "before_entropy")}
        header = (f"warm start (before RL): pass@1 {before['before_pass@1']:.3f}, pass@{k} {before['before_pass@k']:.3f}"
                  f", held-out token entropy {before['before_entropy']:.3f}\n\n")
    seeds = sorted({r["seed"] for r in rows})
    footer = ("\n\nentropies: mean token entropy of the rollouts, first / final = mean of the first / last 10% of "
              "steps; held-out entropy: of the policy's samples on the held-out problems after RL")
    if len(seeds) > 1:
        footer += f"; mean ± 95% CI half-width over seeds {seeds} (Student t)"
    return header + markdown_table(table, cols) + footer


def plot_methods(rows: list[dict], out_dir: Path) -> list[Path]:
    """Per method, the mean over seeds (band: min..max) of the rollout entropy and of every logged
    `eval/pass@k` against the RL step: `entropy_by_method.png`, `eval_pass@k_by_method.png`."""
    groups: dict[str, list[list[dict]]] = {}
    for r in rows:
        groups.setdefault(r.get("method", r["loss"]), []).append(read_metrics(r["run_dir"]))
    keys = sorted({key for runs in groups.values() for run in runs for m in run for key in m
                   if key.startswith("eval/pass@")}, key=lambda s: int(s.split("@")[1]))
    written = [plot_mean_curves(groups, "entropy", out_dir / "entropy_by_method.png",
                                title="Rollout entropy (mean over seeds, band = min..max)",
                                ylabel="mean token entropy (nats)"),
               plot_mean_curves(groups, "eval/entropy", out_dir / "eval_entropy_by_method.png",
                                title="Entropy on the fixed held-out set (mean over seeds)",
                                ylabel="mean token entropy (nats)")]
    for key in keys:
        written.append(plot_mean_curves(groups, key, out_dir / f"eval_{key.split('/')[1]}_by_method.png",
                                        title=f"Held-out {key.split('/')[1]} during training (mean over seeds)",
                                        ylabel=key.split("/")[1]))
    return [p for p in written if p is not None]


def run_ablation(config: str, methods: list[str], seeds: list[int], *, overrides=(), out_dir: str = "ablate_out",
                 demo: bool = False, quick: bool = False) -> str:
    """Run every (seed, method); write `<out>/ablation.md`, `<out>/ablation.json` and the plots; return the table."""
    overrides = list(overrides)
    check_methods(methods, overrides)
    warm = demo or config == "demo"
    if not warm:
        cfg = C.load_config(config, overrides)
        warm = cfg.warmstart.enabled
    if quick and not warm:
        raise C.ConfigError("--quick applies to configs run through the demo pipeline (demo, or warmstart.enabled)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if warm:
        rows = _warm_runs(config, methods, seeds, overrides, out, quick=quick)
    else:
        rows = _config_runs(config, methods, seeds, overrides, out)
    table = format_ablation(rows)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    plot_runs([r["run_dir"] for r in rows], out / "plots",
              labels=[f"{r.get('method', r['loss'])} s{r['seed']}" for r in rows])
    plot_methods(rows, out / "plots")
    print(f"[ablate] {len(rows)} runs ({len(methods)} methods x {len(seeds)} seeds) in {out}; this call "
          f"{time.perf_counter() - t0:.0f} s wall", flush=True)
    return table
