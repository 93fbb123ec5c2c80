"""Chunked vs naive per-token log-prob + entropy: peak memory and time.

    python benchmarks/bench_token_stats.py                  # T=4096, D=1536, V=151,936
    python benchmarks/bench_token_stats.py --T 512 --chunks 128,256 --reps 2   # quick look

Every variant runs in a fresh subprocess, so one variant's allocator state cannot
hide another's peak. In the subprocess: allocate float32 h [1, T, D], w [D, V] and
targets, compile (compile memory is not counted), then reset the kernel's
peak-RSS counter (`/proc/self/clear_refs` = 5), record the current RSS as the
baseline and run `reps` timed calls. Reported memory:

* `peak_rss_MB`: VmHWM - baseline over the timed calls, i.e. everything the call
  allocates beyond its inputs (scratch + outputs; for forward+backward the
  outputs include dW, a [D, V] float32 array both variants must return).
  Buffers this large are mmap'd by malloc and returned to the OS on free, so
  RSS tracks them. Falls back to ru_maxrss - baseline where clear_refs is
  not writable (then compile memory may inflate small numbers).
* `xla_temp_MB`: the compiled executable's `memory_analysis().temp_size_in_bytes`
  (XLA scratch buffers only, independent of the OS).

Time is the median of `reps` calls (after compilation). The machine may be
shared: note the load average printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("naive_fwd", "chunked_fwd", "naive_fwdbwd", "chunked_fwdbwd")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """Run one variant in this (fresh) process and return its measurements."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from entrl.token_stats import naive_token_stats, token_logprobs_and_entropy

    k_h, k_w, k_y, k_a = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k_h, (1, args.T, args.D), jnp.float32)
    w = jax.random.normal(k_w, (args.D, args.V), jnp.float32) / args.D**0.5
    y = jax.random.randint(k_y, (1, args.T), 0, args.V)
    a = jax.random.normal(k_a, (1, args.T), jnp.float32)
    jax.block_until_ready((h, w, y, a))

    if args.variant.startswith("naive"):
        stats = lambda h, w: naive_token_stats(h, w, y, args.temperature)  # noqa: E731
    else:
        stats = lambda h, w: token_logprobs_and_entropy(  # noqa: E731
            h, w, y, temperature=args.temperature, chunk_size=args.chunk
        )
    if args.variant.endswith("fwdbwd"):

        def fn(h, w):  # policy-gradient-like logp term + entropy bonus
            def loss(h, w):
                logp, ent = stats(h, w)
                return jnp.sum(a * logp) + 1e-3 * jnp.sum(ent)

            return jax.value_and_grad(loss, argnums=(0, 1))(h, w)
    else:
        fn = stats

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(h, w).compile()
    compile_s = time.perf_counter() - t0
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    avail = _mem_available_bytes()
    if 1.2 * temp_bytes + 3 * 2**30 > avail:  # shared box: never push others into the OOM killer
        return {
            "variant": args.variant, "chunk": args.chunk if args.variant.startswith("chunked") else None,
            "skipped": f"needs ~{temp_bytes / 2**30:.1f} GiB scratch, {avail / 2**30:.1f} GiB available",
            "xla_temp_MB": temp_bytes / 2**20, "compile_s": round(compile_s, 2),
        }  # fmt: skip

    exact = _reset_peak()
    base_kb = _rss_kb("VmRSS")
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - t0)
        del out
    peak_kb = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": args.variant,
        "chunk": args.chunk if args.variant.startswith("chunked") else None,
        "median_s": statistics.median(times),
        "times_s": [round(t, 3) for t in times],
        "compile_s": round(compile_s, 2),
        "peak_rss_MB": (peak_kb - base_kb) / 1024,
        "xla_temp_MB": temp_bytes / 2**20,
        "peak_exact": exact,
    }


def run_variant(args, variant: str, chunk: int, reps: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", variant, "--T", str(args.T), "--D", str(args.D), "--V", str(args.V),
        "--chunk", str(chunk), "--reps", str(reps), "--temperature", str(args.temperature),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} (chunk {chunk}) failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" in res:
        print(f"  {variant:15s} chunk={str(res['chunk']):5s} SKIPPED: {res['skipped']}", flush=True)
        return res
    print(
        f"  {variant:15s} chunk={str(res['chunk']):5s} median {res['median_s']:7.2f} s {res['times_s']}"
        f"  peak +{res['peak_rss_MB']:8.0f} MB  xla temp {res['xla_temp_MB']:8.0f} MB"
        f"  (compile {res['compile_s']} s)",
        flush=True,
    )
    return res


def _ratio_line(res: dict, ref: dict) -> str:
    if "skipped" in res or "skipped" in ref:
        return f"chunk={res['chunk']:5d}: xla temp {res['xla_temp_MB'] / ref['xla_temp_MB']:6.1%} of naive (not run)"
    return (
        f"chunk={res['chunk']:5d}: peak {res['peak_rss_MB'] / ref['peak_rss_MB']:6.1%} of naive"
        f" (xla temp {res['xla_temp_MB'] / ref['xla_temp_MB']:6.1%}), time {res['median_s'] / ref['median_s']:.2f}x naive"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="tokens (B = 1)")
    p.add_argument("--D", type=int, default=1536, help="hidden size")
    p.add_argument("--V", type=int, default=151_936, help="vocabulary size")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant (median reported)")
    p.add_argument("--chunks", default="256,512,1024,2048", help="chunk sizes swept for the forward pass")
    p.add_argument(
        "--bwd-chunks", default="512", help="chunk sizes for forward+backward ('' to skip); 512 = library default"
    )
    p.add_argument("--bwd-reps", type=int, default=2, help="timed calls per forward+backward variant")
    p.add_argument("--skip-forward", action="store_true", help="only run the forward+backward comparison")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return

    logits_gb = args.T * args.V * 4 / 1e9
    print(f"T={args.T} D={args.D} V={args.V} float32, B=1: one float32 logits copy = {logits_gb:.2f} GB")
    print(f"host: {os.cpu_count()} CPUs, load average at start {os.getloadavg()}")
    chunks = [int(c) for c in args.chunks.split(",") if c]
    bwd_chunks = [int(c) for c in args.bwd_chunks.split(",") if c]

    fwd_ref, fwd = None, []
    if not args.skip_forward:
        print("forward:")
        fwd_ref = run_variant(args, "naive_fwd", 0, args.reps)
        fwd = [run_variant(args, "chunked_fwd", c, args.reps) for c in chunks]
    bwd_ref, bwd = None, []
    if bwd_chunks:
        print("forward+backward (grads w.r.t. h and w):")
        bwd_ref = run_variant(args, "naive_fwdbwd", 0, args.bwd_reps)
        bwd = [run_variant(args, "chunked_fwdbwd", c, args.bwd_reps) for c in bwd_chunks]

    print("\nratios, chunked / naive (targets: peak <= 25%, time <= 1.5x):")
    if fwd_ref:
        print("forward:")
    for r in fwd:
        print("  " + _ratio_line(r, fwd_ref))
    if bwd_ref:
        print("forward+backward:")
        for r in bwd:
            print("  " + _ratio_line(r, bwd_ref))
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
