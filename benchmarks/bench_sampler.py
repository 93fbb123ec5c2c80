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

Ragged lengths (`--ragged`, issue 16): one model (the sweep's, hidden 256),
R = prompts x n rows, prompt 64 tokens, `--new` new tokens, two workloads:
"uniform" (greedy, no EOS: every row runs to the end) and "long-tailed"
(T = 1 and 1% of the vocabulary as EOS ids: on the random model each step
stops a row with probability ~1%, so lengths are roughly geometric, mean ~100,
a few rows cut at the cap). Engines: entrl's one-shot sampler (every row
decodes until the last one stops), entrl with `--slots` slots (continuous
batching: a stopped row's slot takes the next row), the one-shot sampler on
`--slots` rows at a time (one call per chunk of prompts: the same KV-cache
memory as the slots, without refilling), and HF `generate`
(sampling with the same EOS ids; like the one-shot sampler it keeps finished
rows in the batch until all stop). Reported: useful tokens (each response up
to and including its EOS) per second of wall time and per CPU-second, best of
`--repeats` calls, engines interleaved, and the ratio to the one-shot sampler.
entrl's one-shot and slot samplers draw the same tokens (per-row random
streams), so their useful tokens are equal; the chunked calls and HF draw
their own.

Usage:
    python benchmarks/bench_sampler.py                      # the full sweep
    python benchmarks/bench_sampler.py --hidden 256 --batch 16 --threads 1
    python benchmarks/bench_sampler.py --ragged             # one-shot vs slots vs HF, uniform and long-tailed
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


def entrl_ragged_engine(model, prompts_BxP: np.ndarray, new: int, n: int, slots: int, eos: tuple[int, ...],
                        temperature: float):
    """A zero-argument call of entrl's `Sampler` returning the responses' lengths [B*n]."""
    jax, jnp = _jax()
    from entrl.sampling import Sampler, SamplingConfig

    cfg = SamplingConfig(n=n, temperature=temperature, max_new_tokens=new, eos_ids=eos, pad_id=0, slots=slots)
    sampler = Sampler(cfg)
    ids = jnp.asarray(prompts_BxP, jnp.int32)
    mask = jnp.ones_like(ids)

    def call():
        return np.asarray(sampler.sample(model, ids, mask, jax.random.key(0)).lengths)

    return call


def entrl_chunked_engine(model, prompts_BxP: np.ndarray, new: int, n: int, rows: int, eos: tuple[int, ...],
                         temperature: float):
    """The one-shot sampler on `rows // n` prompts at a time, one call after another: the KV memory of
    `rows` slots without continuous batching (what bounds a rollout's memory otherwise)."""
    jax, jnp = _jax()
    from entrl.sampling import Sampler, SamplingConfig

    per_call = rows // n
    if per_call < 1 or len(prompts_BxP) % per_call:
        raise SystemExit(f"--slots {rows} must be a multiple of --n {n} dividing the {len(prompts_BxP)} prompts")
    sampler = Sampler(SamplingConfig(n=n, temperature=temperature, max_new_tokens=new, eos_ids=eos, pad_id=0))
    chunks = [jnp.asarray(prompts_BxP[i:i + per_call], jnp.int32) for i in range(0, len(prompts_BxP), per_call)]

    def call():
        out = [sampler.sample(model, ids, jnp.ones_like(ids), jax.random.fold_in(jax.random.key(0), i)).lengths
               for i, ids in enumerate(chunks)]
        return np.concatenate([np.asarray(x) for x in out])

    return call


def hf_ragged_engine(hf, prompts_BxP: np.ndarray, new: int, n: int, eos: tuple[int, ...], temperature: float):
    """A zero-argument call of HF `generate` (n samples per prompt) returning the responses' lengths."""
    import torch

    ids = torch.tensor(np.repeat(prompts_BxP, n, axis=0), dtype=torch.long)
    kw = dict(pad_token_id=0, attention_mask=torch.ones_like(ids), max_new_tokens=new)
    if temperature > 0:
        kw |= dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw |= dict(do_sample=False)
    kw |= dict(eos_token_id=list(eos)) if eos else dict(eos_token_id=None, min_new_tokens=new)

    def call():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf.generate(ids, **kw)[:, prompts_BxP.shape[1]:].numpy()
        stop = np.isin(out, eos) if eos else np.zeros(out.shape, bool)
        return np.where(stop.any(1), stop.argmax(1) + 1, out.shape[1])

    with torch.inference_mode():  # warm-up: first-call allocations, lazy imports
        hf.generate(ids[:2, :8], max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    return call


def ragged_main(args) -> int:
    """One-shot vs slots vs HF `generate` on uniform and long-tailed response lengths (module docstring)."""
    import torch

    hidden, prompts, n, new, slots = args.hidden[0], args.prompts, args.n, args.new, args.slots
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} torch threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()}; hidden {hidden}, {LAYERS} layers, vocab {VOCAB}; {prompts} prompts x {n} = "
          f"{prompts * n} rows, prompt {args.prompt}, {new} new tokens, {slots} slots")  # fmt: skip
    eos = tuple(range(1, 1 + VOCAB // 100))  # 1% of the vocabulary
    workloads = {"uniform": dict(eos=(), temperature=0.0), "long-tailed": dict(eos=eos, temperature=1.0)}
    prompts_BxP = np.random.default_rng(0).integers(1, VOCAB, size=(prompts, args.prompt))
    header = ("workload", "engine", "useful tokens", "mean length", "wall s", "useful tok/s", "vs one-shot",
              "cpu s", "tok/cpu-s", "vs one-shot (cpu)", "compile s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as path:
        hf, model = build_models(hidden, path)
        for wname, w in workloads.items():
            engines = {"one-shot": entrl_ragged_engine(model, prompts_BxP, new, n, 0, **w),
                       f"slots={slots}": entrl_ragged_engine(model, prompts_BxP, new, n, slots, **w),
                       f"one-shot, {slots}-row chunks": entrl_chunked_engine(model, prompts_BxP, new, n, slots, **w)}
            if not args.skip_hf:
                engines["HF generate"] = hf_ragged_engine(hf, prompts_BxP, new, n, **w)
            compile_s = {}
            for name, call in engines.items():  # compile (entrl) / warm up, excluded from the timings
                if not name.startswith("HF"):
                    compile_s[name] = _timed(call)[1]
            best = {k: [float("inf"), float("inf")] for k in engines}
            lengths = {}
            for _ in range(args.repeats):  # interleaved, so every engine sees the same load
                for name, call in engines.items():
                    lengths[name], wall, cpu = _timed(call)
                    best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            base = best["one-shot"]
            if not np.array_equal(lengths["one-shot"], lengths[f"slots={slots}"]):
                print(f"#   warning: {wname}: one-shot and slot lengths differ", flush=True)
            for name in engines:
                tokens = int(lengths[name].sum())
                row = dict(workload=wname, engine=name, useful_tokens=tokens, mean_length=float(lengths[name].mean()),
                           wall_s=best[name][0], tok_s=tokens / best[name][0], cpu_s=best[name][1],
                           tok_cpu_s=tokens / best[name][1],
                           compile_s=compile_s[name] - best[name][0] if name in compile_s else None)  # fmt: skip
                one = int(lengths["one-shot"].sum())
                row["vs_one_shot"] = row["tok_s"] / (one / base[0])
                row["vs_one_shot_cpu"] = row["tok_cpu_s"] / (one / base[1])
                rows.append(row)
                cells = [wname, name, str(tokens), f"{row['mean_length']:.1f}", f"{row['wall_s']:.1f}",
                         f"{row['tok_s']:.0f}", f"{row['vs_one_shot']:.2f}x", f"{row['cpu_s']:.1f}",
                         f"{row['tok_cpu_s']:.0f}", f"{row['vs_one_shot_cpu']:.2f}x",
                         "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}"]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)
        del hf, model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    return 0


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
    ap.add_argument("--ragged", action="store_true",
                    help="one-shot vs slots vs HF on uniform and long-tailed lengths (see the module docstring)")
    ap.add_argument("--prompts", type=int, default=32, help="--ragged: prompts per call")
    ap.add_argument("--n", type=int, default=4, help="--ragged: samples per prompt")
    ap.add_argument("--slots", type=int, default=32, help="--ragged: slots of the continuous-batching sampler")
    args = ap.parse_args(argv)
    _set_threads(args.threads)
    if args.ragged:
        if "--new" not in (argv if argv is not None else sys.argv):
            args.new = 512
        return ragged_main(args)
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
                fmt = lambda k, f, row=row: f.format(row[k]) if k in row else "-"
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
