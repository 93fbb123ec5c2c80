"""Benchmark: entrl's jitted KV-cache sampler vs `transformers` `generate` on CPU.

Sweep (issue 7): Qwen2-layout models with 4 layers, vocab 32k and hidden
256 / 512 / 1024 (head_dim 64, kv heads = heads / 2, MLP width 4 * hidden,
untied lm_head), batch 16 and 128, prompt 64 tokens, 128 new tokens, greedy,
no EOS (every row runs to the end, so both engines do identical work). Both
engines use the same float32 weights: the random HF model is saved with
`save_pretrained` and loaded by `entrl.models.load_pretrained`; the first 16
tokens of every row are checked to agree.

Reported per case: tokens/s of each engine (new tokens / wall time of the
whole call, prefill included, compile excluded; the best of `--repeats`
calls, the two engines interleaved so both see the same machine load), their
ratio, the same per CPU-second of the process (robust to other jobs on a
shared machine, which stretch wall time but not CPU time), and the
roofline: per decode step, the bytes that must be read (all weights except the
embedding table, of which only B rows are read, plus the KV cache at the
current context length) over the memory bandwidth measured in this run (a
large numpy copy), and the FLOPs (2 * B * matmul params + attention) over the
measured large-matmul rate; the roofline time of a call is the prefill's
FLOP time plus the sum over decode steps of max(bytes / BW, FLOPs / rate).
"fraction" = roofline time / measured time.

Threads: by default both engines get every core (`--threads`, default
`os.cpu_count()`): XLA through `--xla_cpu_multi_thread_eigen=true`, torch
through `torch.set_num_threads`. `--threads 1` sets the XLA flag to false and
torch to one thread, but is not a one-core comparison: XLA:CPU (jax 0.10)
still runs its matmul library on a second thread (a quiet 2-core box measured
~1.7 CPU-seconds per wall-second for entrl at `--threads 1`), while torch then
really uses one. The per-CPU-second columns are there for a loaded machine,
where other jobs stretch wall time but not CPU time; with all cores both
engines burn about 2 CPU-seconds per wall-second on 2 cores whether or not
the work splits evenly, so on a quiet machine the wall columns are the
comparison.

Usage:
    python benchmarks/bench_sampler.py                      # the full sweep
    python benchmarks/bench_sampler.py --hidden 256 --batch 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from roofline import decode_roofline  # benchmarks/roofline.py (this script's directory)


def _set_threads(threads: int) -> None:
    """Must run before JAX creates its CPU client (XLA reads XLA_FLAGS then)."""
    flag = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp

VOCAB, LAYERS, HEAD_DIM = 32_000, 4, 64


# ----------------------------------------------------------------------------
# Machine rates
# ----------------------------------------------------------------------------
def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large array copy (read + write counted), best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def measure_matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n x n float32 matmul in JAX and in torch, best of `repeats`."""
    jax, jnp = _jax()
    rates = {}
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    rates["jax"] = 2 * n**3 / best
    import torch

    x = torch.ones(n, n)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    rates["torch"] = 2 * n**3 / best
    return rates


# ----------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------
def build_models(hidden: int, path: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from entrl.models import load_pretrained

    heads = hidden // HEAD_DIM
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(path)
    return hf, load_pretrained(path, dtype="float32")


def _timed(fn) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def entrl_engine(model, prompts_BxP: np.ndarray, new: int):
    """A zero-argument call of entrl's greedy generate returning the new tokens [B, new]."""
    from entrl import sampling

    kw = dict(temperature=0.0, max_new_tokens=new, eos_ids=(), pad_id=0, buckets=(prompts_BxP.shape[1],))
    prompts = prompts_BxP.tolist()
    return lambda: np.asarray(sampling.generate(model, prompts, **kw).tokens)


def hf_engine(hf, prompts_BxP: np.ndarray, new: int):
    """A zero-argument call of HF greedy `generate` returning the new tokens [B, new]."""
    import torch

    ids = torch.tensor(prompts_BxP, dtype=torch.long)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))

    def call():
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        return out[:, prompts_BxP.shape[1] :].numpy()

    with torch.inference_mode():  # warm-up: first-call allocations, lazy imports
        hf.generate(ids[:2, :8], max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    return call


# ----------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of each engine (default: all cores; see the module docstring)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per engine (interleaved; best is kept)")
    ap.add_argument("--skip-hf", action="store_true", help="time only entrl")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    _set_threads(args.threads)
    import torch

    bw = measure_bandwidth()
    rates = measure_matmul_rate()
    rate = max(rates.values())
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} torch threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()}")  # fmt: skip
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s; 2048^3 matmul: jax {rates['jax'] / 1e9:.0f} GFLOP/s, "
          f"torch {rates['torch'] / 1e9:.0f} GFLOP/s (roofline uses the larger)")  # fmt: skip
    header = ("hidden", "batch", "entrl tok/s", "HF tok/s", "ratio", "entrl tok/cpu-s", "HF tok/cpu-s",
              "cpu ratio", "roofline tok/s", "bound", "entrl frac", "HF frac", "compile s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    rng = np.random.default_rng(0)
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory() as path:
            hf, model = build_models(hidden, path)
            for batch in args.batch:
                prompts = rng.integers(1, VOCAB, size=(batch, args.prompt))
                roof = decode_roofline(model.cfg, batch, args.prompt, args.new, bw, rate, elem=4)
                ntok = batch * args.new
                engines = {"entrl": entrl_engine(model, prompts, args.new)}
                if not args.skip_hf:
                    engines["hf"] = hf_engine(hf, prompts, args.new)
                toks, first, _ = _timed(engines["entrl"])  # compiles
                best = {k: [float("inf"), float("inf")] for k in engines}
                outputs = {}
                for _ in range(args.repeats):  # interleaved, so both see the same load
                    for name, call in engines.items():
                        outputs[name], wall, cpu = _timed(call)
                        best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
                row = dict(hidden=hidden, batch=batch, entrl_tok_s=ntok / best["entrl"][0],
                           entrl_tok_cpu_s=ntok / best["entrl"][1], compile_s=first - best["entrl"][0],
                           roofline_tok_s=ntok / roof["seconds"], bound=roof["bound"],
                           entrl_frac=roof["seconds"] / best["entrl"][0])  # fmt: skip
                if "hf" in engines:
                    row |= dict(hf_tok_s=ntok / best["hf"][0], hf_tok_cpu_s=ntok / best["hf"][1],
                                ratio=best["hf"][0] / best["entrl"][0], cpu_ratio=best["hf"][1] / best["entrl"][1],
                                hf_frac=roof["seconds"] / best["hf"][0],
                                agree16=float(np.mean(outputs["hf"][:, :16] == outputs["entrl"][:, :16])))  # fmt: skip
                rows.append(row)
                fmt = lambda k, f: f.format(row[k]) if k in row else "-"  # noqa: E731
                cells = [str(hidden), str(batch), fmt("entrl_tok_s", "{:.0f}"), fmt("hf_tok_s", "{:.0f}"),
                         fmt("ratio", "{:.2f}x"), fmt("entrl_tok_cpu_s", "{:.0f}"), fmt("hf_tok_cpu_s", "{:.0f}"),
                         fmt("cpu_ratio", "{:.2f}x"), fmt("roofline_tok_s", "{:.0f}"), row["bound"],
                         fmt("entrl_frac", "{:.0%}"), fmt("hf_frac", "{:.0%}"), fmt("compile_s", "{:.1f}")]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)
                if "agree16" in row and row["agree16"] < 0.99:
                    print(f"#   warning: only {row['agree16']:.0%} of the first 16 tokens agree with HF", flush=True)
            del hf, model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, matmul=rates, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
