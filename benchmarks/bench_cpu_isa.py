"""Do the demo's numbers depend on the CPU's instruction set, and what does capping it cost?

XLA:CPU compiles every kernel for the host CPU: on a machine with AVX-512 it
vectorises with 512-bit registers, on an AVX2 machine with 256-bit ones, so
reductions (softmax sums, layer norms, matmul accumulations) add the same
numbers in another order and the last bits differ. Over hundreds of SFT and RL
steps those bits grow into different samples, different rewards and different
pass@1. `--xla_cpu_max_isa=<ISA>` caps the features XLA:CPU compiles for; this
script measures what each cap changes and what the AVX2 cap costs.

Workload (one child process per setting, so each gets its own XLA_FLAGS): the
demo's model (hidden 128, 4 layers, character tokenizer) warm-started from its
seeded random init by `--sft-steps` steps of the demo's noisy-teacher SFT, then
one sampler call over 64 held-out prompts x 8 samples at T = 1. The child
prints a SHA-256 of the final parameters' bytes and of the sampled tokens
(equal hashes = bitwise equal results), then runs the same workload again in
the same process (compiled already) and reports that second wall time.

Two parts:
  1. bitwise comparison: one child per cap (native, AMX, AVX512, AVX2, AVX, SSE4_2);
  2. cost: native and AVX2 children alternated `--reps` times; the ratio of the
     medians of the steady-state (second) runs, and of the first runs (with compile).

Usage: python benchmarks/bench_cpu_isa.py [--sft-steps 40] [--reps 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CAPS = ("native", "AMX", "AVX512", "AVX2", "AVX", "SSE4_2")


def _cpu() -> dict:
    flags = set()
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            "isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))}


def workload(sft_steps: int) -> dict:
    """One run of the probe in this process; hashes of the parameters and the samples, and the wall time."""
    import jax
    import numpy as np

    from entrl import config as C
    from entrl.demo import DEMO_YAML, warm_start
    from entrl.rl.setup import build_records, build_sampler, tokenize
    from entrl.sampling import pad_prompts
    from entrl.tokenizer import CharTokenizer

    cfg = C.load_config(DEMO_YAML, ["train.out_dir=/nonexistent"])
    tokenizer = CharTokenizer()
    train, held = build_records(cfg)
    held_tokens, _ = tokenize(cfg, held[:64], tokenizer)
    t0 = time.perf_counter()
    graphdef, params, losses = warm_start(cfg, tokenizer, train, sft_steps=sft_steps, seed=0, sft_problems=4000)
    sampler = build_sampler(cfg, tokenizer, None)
    ids, mask = pad_prompts(held_tokens, pad_id=tokenizer.pad_token_id, buckets=cfg.rollout.prompt_buckets)
    roll = sampler.sample((graphdef, params), ids, mask, jax.random.key(0))
    tokens = np.asarray(roll.tokens)
    wall = time.perf_counter() - t0
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    return {
        "params_sha256": hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()[:16],
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
        "sft_loss_last": float(losses[-1]),
        "wall_s": wall,
    }


def child(sft_steps: int) -> None:
    first = workload(sft_steps)
    second = workload(sft_steps)
    assert (first["params_sha256"], first["tokens_sha256"]) == (second["params_sha256"], second["tokens_sha256"]), \
        "not deterministic within one process"
    print(json.dumps({**first, "first_wall_s": first["wall_s"], "wall_s": second["wall_s"]}))


def run_child(cap: str, sft_steps: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_max_isa")]
    if cap != "native":
        flags.append(f"--xla_cpu_max_isa={cap}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["ENTRL_CPU_ISA"] = "native"  # entrl's own default (if any) must not override the cap under test
    out = subprocess.run([sys.executable, __file__, "--child", "--sft-steps", str(sft_steps)], env=env,
                         capture_output=True, text=True, check=True)
    return {"cap": cap, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--caps", default=",".join(CAPS))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.sft_steps)
        return

    print(f"CPU: {_cpu()}", flush=True)
    rows = []
    for cap in args.caps.split(","):
        row = run_child(cap, args.sft_steps)
        rows.append(row)
        print(f"{cap:8s} params {row['params_sha256']} tokens {row['tokens_sha256']} "
              f"sft loss {row['sft_loss_last']:.9f}  first {row['first_wall_s']:.1f} s  again {row['wall_s']:.1f} s",
              flush=True)

    if args.reps < 1:
        return
    timing: dict[str, list] = {"native": [], "AVX2": []}
    for rep in range(args.reps):
        for cap in (("native", "AVX2") if rep % 2 == 0 else ("AVX2", "native")):
            timing[cap].append(run_child(cap, args.sft_steps))
    med = {cap: statistics.median(r["wall_s"] for r in rs) for cap, rs in timing.items()}
    med_first = {cap: statistics.median(r["first_wall_s"] for r in rs) for cap, rs in timing.items()}
    print(f"steady state, median of {args.reps}: native {med['native']:.2f} s, AVX2 {med['AVX2']:.2f} s, "
          f"AVX2/native = {med['AVX2'] / med['native']:.3f}")
    print(f"first run (with compile), median of {args.reps}: native {med_first['native']:.2f} s, "
          f"AVX2 {med_first['AVX2']:.2f} s, AVX2/native = {med_first['AVX2'] / med_first['native']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": _cpu(), "sft_steps": args.sft_steps, "caps": rows, "timing": timing,
                       "median_wall_s": med, "median_first_wall_s": med_first}, f, indent=2)


if __name__ == "__main__":
    main()
