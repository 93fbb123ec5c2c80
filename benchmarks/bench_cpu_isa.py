"""Do the demo's numbers depend on the CPU's instruction set, and what does capping it cost?

XLA:CPU compiles every kernel for the host CPU: on a machine with AVX-512 it
vectorises with 512-bit registers, on an AVX2 machine with 256-bit ones, so
reductions (softmax sums, layer norms, matmul accumulations) add the same
numbers in another order and the last bits differ. Over hundreds of SFT and RL
steps those bits grow into different samples, different rewards and different
pass@1. `--xla_cpu_max_isa=<ISA>` caps the features XLA:CPU compiles for; this
script measures what each cap changes and what the AVX2 cap costs.

XLA:CPU also splits loops into as many tasks as it sees cores (the
`outer_dimension_partitions` of its fusions) and its matmul libraries split work
over the same thread pool, so the number of cores the process may use changes
results too. `--cores k` pins the child to its first k allowed cores
(`os.sched_setaffinity`, before JAX starts), which every machine with k cores
can reproduce.

Workload (one child process per setting, so each gets its own XLA_FLAGS and
affinity): the demo's model (`--model demo`: hidden 128, 4 layers; `quick`: the
`entrl demo --quick` sizes, hidden 32, 1 layer; character tokenizer)
warm-started from its seeded random init by `--sft-steps` steps of the demo's
noisy-teacher SFT, then one sampler call over 64 held-out prompts x 8 samples
at T = 1. The child prints a SHA-256 of the final parameters' bytes and of the
sampled tokens (equal hashes = bitwise equal results), then runs the same
workload again in the same process (compiled already) and reports that second
wall time.

Two parts:
  1. bitwise comparison: one child per (cap, cores) in `--caps` x `--cores`;
  2. cost: the native setting (all cores, no cap) and `--portable` (default:
     AVX2 cap on 1 core) alternated `--reps` times; the ratio of the medians of
     the steady-state (second) runs, and of the first runs (with compile).

Usage: python benchmarks/bench_cpu_isa.py [--model demo] [--sft-steps 40] [--caps native,AVX2]
                                          [--cores 0,1] [--reps 5] [--out results.json]
(cores 0 = all allowed cores)
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


def workload(sft_steps: int, model: str) -> dict:
    """One run of the probe in this process; hashes of the parameters and the samples, and the wall time."""
    import jax
    import numpy as np

    from entrl import config as C
    from entrl.demo import DEMO_YAML
    from entrl.rl.setup import build_records, tokenize, warm_start
    from entrl.sampling import build_sampler, pad_prompts
    from entrl.tokenizer import CharTokenizer

    sizes = ["model.demo_hidden=32", "model.demo_layers=1", "model.demo_heads=2"] if model == "quick" else []
    cfg = C.load_config(DEMO_YAML, ["train.out_dir=/nonexistent", f"warmstart.steps={sft_steps}",
                                    "warmstart.problems=4000", *sizes])
    tokenizer = CharTokenizer()
    train, held = build_records(cfg)
    held_tokens, _ = tokenize(cfg, held[:64], tokenizer)
    t0 = time.perf_counter()
    graphdef, params, losses = warm_start(cfg, tokenizer, train, seed=0)
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


def child(sft_steps: int, model: str) -> None:
    first = workload(sft_steps, model)
    second = workload(sft_steps, model)
    assert (first["params_sha256"], first["tokens_sha256"]) == (second["params_sha256"], second["tokens_sha256"]), \
        "not deterministic within one process"
    print(json.dumps({**first, "first_wall_s": first["wall_s"], "wall_s": second["wall_s"]}))


def run_child(cap: str, cores: int, sft_steps: int, model: str) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_max_isa")]
    if cap != "native":
        flags.append(f"--xla_cpu_max_isa={cap}")
    env["XLA_FLAGS"] = " ".join(flags)
    out = subprocess.run([sys.executable, __file__, "--child", "--sft-steps", str(sft_steps), "--model", model,
                          "--cores", str(cores)], env=env, capture_output=True, text=True, check=True)
    return {"cap": cap, "cores": cores or len(os.sched_getaffinity(0)), **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("demo", "quick"), default="demo")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--caps", default=",".join(CAPS))
    p.add_argument("--cores", default="0", help="comma-separated core counts to pin to (0 = all allowed)")
    p.add_argument("--portable", default="AVX2:1", help="the setting timed against native, as CAP:CORES")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if int(args.cores):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(args.cores)])
        child(args.sft_steps, args.model)
        return

    print(f"CPU: {_cpu()}; model {args.model}, {args.sft_steps} SFT steps", flush=True)
    rows = []
    for cores in map(int, args.cores.split(",")):
        for cap in args.caps.split(","):
            row = run_child(cap, cores, args.sft_steps, args.model)
            rows.append(row)
            print(f"{cap:8s} {row['cores']} cores  params {row['params_sha256']} tokens {row['tokens_sha256']} "
                  f"sft loss {row['sft_loss_last']:.9f}  first {row['first_wall_s']:.1f} s  "
                  f"again {row['wall_s']:.1f} s", flush=True)
    result = {"cpu": _cpu(), "model": args.model, "sft_steps": args.sft_steps, "settings": rows}
    if args.reps >= 1:
        cap, cores = args.portable.split(":")
        settings = {"native": ("native", 0), "portable": (cap, int(cores))}
        timing: dict[str, list] = {"native": [], "portable": []}
        for rep in range(args.reps):  # alternated, so drifting load hits both alike
            for name in (("native", "portable") if rep % 2 == 0 else ("portable", "native")):
                timing[name].append(run_child(*settings[name], args.sft_steps, args.model))
        med = {k: statistics.median(r["wall_s"] for r in rs) for k, rs in timing.items()}
        first = {k: statistics.median(r["first_wall_s"] for r in rs) for k, rs in timing.items()}
        print(f"steady state, median of {args.reps}: native {med['native']:.2f} s, {args.portable} "
              f"{med['portable']:.2f} s, ratio {med['portable'] / med['native']:.3f}")
        print(f"first run (with compile), median of {args.reps}: native {first['native']:.2f} s, {args.portable} "
              f"{first['portable']:.2f} s, ratio {first['portable'] / first['native']:.3f}")
        result.update(portable=args.portable, timing=timing, median_wall_s=med, median_first_wall_s=first)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
