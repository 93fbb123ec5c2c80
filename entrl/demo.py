"""`entrl demo`: the whole SENT pipeline on a CPU in minutes, with nothing downloaded.

What it does, in order:
1. Builds the synthetic arithmetic task (`entrl.data.tasks.ArithmeticTask`): short
   integer expressions like `3+4*2`, disjoint train / held-out problems, and the
   demo's character tokenizer.
2. Creates a tiny Qwen2-layout model in-process and warm-starts it with SFT on a
   *noisy teacher*: worked solutions of which a fixed share contain a realistic
   mistake (an off-by-one step, or left-to-right evaluation ignoring precedence).
   The warm-started policy is right often but not always, which is what RL with a
   verifiable reward can improve (a clean teacher leaves too few mixed groups).
3. Evaluates the warm-started policy on the held-out problems (T = 1 sampling).
4. Runs `entrl train` on the warm-started policy: semantic-entropy annotation of the
   training prompts with that policy (N samples each, answers clustered), the SE
   curriculum (low -> high, 2 stages), and the SENT token loss.
5. Evaluates again and writes `summary.json` with before/after pass@1, pass@k and
   mean token entropy, the paired 95% confidence interval of the pass@1 gain, the
   wall time, plus metrics, plots and the final checkpoint.

What it shows: the library's real code path end to end (sampler, rewards, SE,
curriculum, loss, checkpoints, metrics) and a measurable RL gain on held-out
problems. What it does not show: anything about LLM-scale reasoning; the task is
tiny and the gain comes from RL un-learning the teacher's systematic mistakes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from entrl import config as C
from entrl.evaluation import evaluate_prompts
from entrl.metrics import plot_runs
from entrl.models.lora import merge_adapters
from entrl.rl.setup import build_records, build_verifier, save_policy, tokenize, train_from_config, warm_start
from entrl.sampling import build_sampler
from entrl.tokenizer import CharTokenizer

log = logging.getLogger("entrl.demo")

DEMO_YAML = Path(__file__).parent / "configs" / "demo.yaml"

# The warm start (SFT on the noisy teacher) is configured by the `warmstart` section: 550 steps (350 left
# the policy under-trained: greedy 39%, T=1 18%; 550 reach 70% / 39%), 45% flawed solutions, 4000 problems.
EVAL_BATCH_PROMPTS = 250
QUICK = {  # tiny sizes for tests / smoke runs (`entrl demo --quick`)
    "overrides": ["train.steps=2", "data.arithmetic_train_size=64", "data.arithmetic_heldout_size=32",
                  "curriculum.samples=4", "rollout.n=4", "train.prompts_per_step=8", "train.minibatch_prompts=8",
                  "train.microbatch_per_shard=0", "model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2",
                  "eval.n=2", "eval.k=[1, 2]", "warmstart.steps=30", "warmstart.problems=256", "val.n=2",
                  "val.k=[1, 2]", "val.max_problems=8"],
}


def demo_config(out_dir: str | Path, *, seed: int = 0, quick: bool = False, overrides=(),
                base: str | Path = DEMO_YAML) -> C.RunConfig:
    """The demo's run config (`base`: the packaged demo.yaml, or another arithmetic config such as
    configs/collapse.yaml), its RL run in `<out_dir>/rl`."""
    small = list(QUICK["overrides"]) if quick else []
    return C.load_config(base, small + [f"train.out_dir={Path(out_dir) / 'rl'}", f"train.seed={seed}",
                                        f"curriculum.seed={seed}", *overrides])


def paired_ci(before: np.ndarray, after: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """Mean gain and its normal-approximation 95% CI from per-problem paired accuracies."""
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return mean, mean - half, mean + half


@dataclasses.dataclass
class DemoContext:
    """The warm-started policy and the held-out evaluation shared by the demo and `entrl ablate --demo`."""

    cfg: C.RunConfig
    tokenizer: object
    graphdef: object
    warm_params: object
    warm_dir: Path
    held_tokens: list
    held_answers: list
    verifier: object
    eval_sampler: object
    before: dict
    sft_losses: list

    def evaluate(self, params, tag: str) -> dict:
        cfg, ks = self.cfg, tuple(self.cfg.eval.k)
        res = evaluate_prompts(self.eval_sampler, self.graphdef, params, self.tokenizer, self.held_tokens,
                               self.held_answers, verifier=self.verifier, n=cfg.eval.n, ks=ks,
                               seed=cfg.train.seed + 12345, with_entropy=True, buckets=cfg.rollout.prompt_buckets,
                               batch_prompts=EVAL_BATCH_PROMPTS)
        print(f"[demo] {tag}: pass@1 {res['pass@1']:.3f}  pass@{ks[-1]} {res[f'pass@{ks[-1]}']:.3f}  "
              f"entropy {res['entropy']:.3f}", flush=True)
        return res

    def close(self):
        self.verifier.close()


def _eval_sampler(cfg: C.RunConfig, tokenizer):
    """The before/after evaluation's sampler: `eval.n` samples at `eval.temperature` / `top_p` / `top_k`, with the
    rollout's response budget (`eval.max_new_tokens` is the paper benchmarks' 8,000, past the demo model's context)."""
    e = cfg.eval
    return build_sampler(cfg, tokenizer, None, n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)


def prepare(out: Path, *, seed: int = 0, quick: bool = False, overrides=(), base: str | Path = DEMO_YAML) -> DemoContext:
    """Steps 1-3: task, warm start (saved to `out/warmstart`), evaluation before RL."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, seed=seed, quick=quick, overrides=overrides, base=base)
    if cfg.model.path != "demo" or cfg.data.task != "arithmetic":
        raise C.ConfigError(f"the demo pipeline warm-starts the demo model on the arithmetic task; this config has "
                            f"model.path={cfg.model.path!r}, data.task={cfg.data.task!r}")
    tokenizer = CharTokenizer()
    train_records, held_records = build_records(cfg)
    held_tokens, held_records = tokenize(cfg, held_records, tokenizer)
    print(f"[demo] warm-start: SFT on a noisy teacher ({cfg.warmstart.error_rate:.0%} of solutions contain a "
          f"mistake, {cfg.warmstart.steps} steps)", flush=True)
    graphdef, params, sft_losses = warm_start(cfg, tokenizer, train_records, seed=None)
    warm_dir = save_policy(graphdef, params, tokenizer, out / "warmstart")
    ctx = DemoContext(cfg=cfg, tokenizer=tokenizer, graphdef=graphdef, warm_params=params, warm_dir=warm_dir,
                      held_tokens=held_tokens, held_answers=[r.answer for r in held_records],
                      verifier=build_verifier(cfg), eval_sampler=_eval_sampler(cfg, tokenizer),
                      before={}, sft_losses=sft_losses)
    ctx.before = ctx.evaluate(params, "before RL")
    return ctx


def rl_and_evaluate(ctx: DemoContext, out_dir: Path, overrides=()) -> tuple[object, dict]:
    """Step 4-5: SE annotation + curriculum RL from the warm start into `out_dir`, then evaluate."""
    cfg = C.load_config(None, [*_cfg_overrides(ctx.cfg), f"model.path={ctx.warm_dir}", "warmstart.enabled=false",
                               f"model.tokenizer={ctx.warm_dir}", f"train.out_dir={out_dir}", *overrides])
    cur = cfg.curriculum
    plan = f"SE curriculum {cur.order} ({cur.stages} stages)" if cur.enabled else "no curriculum (shuffled epochs)"
    print(f"[demo] RL: {cfg.loss.name}, {plan}, {cfg.train.steps} steps", flush=True)
    trainer = train_from_config(cfg, resume=False, overwrite=True)  # the demo always starts its RL afresh
    policy = nnx.state(merge_adapters(nnx.merge(trainer.comps.graphdef, trainer.params)))  # as `policy/` holds it
    return trainer, ctx.evaluate(policy, f"after RL ({cfg.loss.name})")


def _cfg_overrides(cfg: C.RunConfig) -> list[str]:
    """The resolved config as dotted overrides (so a derived run starts from exactly this config)."""
    out = []
    for section, values in C.to_dict(cfg).items():
        for key, value in values.items():
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def summarize_demo(ctx: DemoContext, trainer, after: dict, wall: float) -> dict:
    ks = tuple(ctx.cfg.eval.k)
    before = ctx.before
    gain, lo, hi = paired_ci(before["per_problem_pass@1"], after["per_problem_pass@1"])
    pick = lambda r: {"pass@1": r["pass@1"], f"pass@{ks[-1]}": r[f"pass@{ks[-1]}"], "pass@k": r[f"pass@{ks[-1]}"],
                      "entropy": r["entropy"], "response_length": r["response_length"]}
    return {
        "before": pick(before),
        "after": pick(after),
        "k": ks[-1],
        "pass@1_gain": gain,
        "pass@1_gain_ci95": [lo, hi],
        "heldout_problems": len(ctx.held_tokens),
        "samples_per_problem": ctx.cfg.eval.n,
        "loss": trainer.cfg.loss.name,
        "rl_steps": trainer.step,
        "sft_final_loss": ctx.sft_losses[-1] if ctx.sft_losses else None,
        "wall_seconds": wall,
        "machine": machine_info(),
    }


def machine_info() -> dict:
    """What the numbers may depend on (README, 'Which numbers depend on the machine')."""
    cpu, isa = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not isa:
                    isa = sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "isa": isa, "cores": cores, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "backend": jax.default_backend()}


def run_demo(out_dir: str | Path = "demo_out", *, overrides=(), seed: int = 0, quick: bool = False) -> dict:
    """The whole demo; prints the before/after table and writes `<out_dir>/summary.json`."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    ctx = prepare(out, seed=seed, quick=quick, overrides=overrides)
    try:
        trainer, after = rl_and_evaluate(ctx, out / "rl")
    finally:
        ctx.close()
    summary = summarize_demo(ctx, trainer, after, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_runs([str(out / "rl")], out / "plots")
    except Exception as e:  # plots are a convenience; never lose the run over them
        log.warning("plotting failed: %s", e)
    print(format_table(summary))
    return summary


def format_table(s: dict) -> str:
    k = s["k"]
    b, a = s["before"], s["after"]
    lo, hi = s["pass@1_gain_ci95"]
    rows = [
        "| held-out metric | before RL | after RL |",
        "|---|---|---|",
        f"| pass@1 (T=1) | {b['pass@1']:.3f} | {a['pass@1']:.3f} |",
        f"| pass@{k} | {b['pass@k']:.3f} | {a['pass@k']:.3f} |",
        f"| mean token entropy | {b['entropy']:.3f} | {a['entropy']:.3f} |",
        "",
        f"pass@1 gain {s['pass@1_gain']:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}) on {s['heldout_problems']} held-out "
        f"problems x {s['samples_per_problem']} samples; {s['rl_steps']} RL steps of {s['loss']}; "
        f"wall {s['wall_seconds']:.0f} s",
    ]
    return "\n".join(rows)
