"""Benchmark: entrl's sampler on one GPU at the paper's smallest model (issue 7).

The DeepSeek-R1-Distill-Qwen-1.5B configuration (`PRESETS`) with random bfloat16
weights, bfloat16 KV cache, greedy decoding with no EOS (every row runs to the
end), prompt 128 tokens, 1024 new tokens, batch 64 and 256. Reported per batch:

- decode tokens/s of the entrl sampler: new tokens / wall time of the whole
  jitted call (prefill included; the prefill's own share, timed separately with
  a 1-token call, is printed too), median of `--repeats` calls after the
  compile;
- the memory-bandwidth bound: per decode step, the bytes that must be read
  (every weight except the embedding table, of which only B rows are read,
  plus the K/V cache at the current context length) summed over the steps and
  divided by the HBM bandwidth measured in this run (a large on-device copy,
  read + write counted); the FLOP bound likewise from a measured bf16 matmul
  rate; "fraction" = bound time / measured time;
- the named baseline, measured in the same run on the same GPU: Hugging Face
  `transformers` `generate` (torch, bfloat16, its default dynamic KV cache,
  the same config with its own random weights; `min_new_tokens` forces the
  same 1024 tokens), and the ratio entrl / HF.

`--ragged` (issue 16): a paper-sized RL step instead. 256 prompts x 8 samples
(2,048 rows), prompt 128, 2,048 new tokens, T = 1, with `--eos-frac` of the
vocabulary (default 0.1%) as EOS ids: on the random model a row stops with
probability ~0.1% per token, so lengths are roughly geometric (mean ~900, ~13%
cut at 2,048), a long tail like real reasoning rollouts. Engines: the slot
sampler at each of `--slots` (continuous batching), and the one-shot sampler
on `--oneshot-prompts` prompts (default all 256: its 2,048-row bf16 KV cache
is ~128 GB and is expected not to fit; the error is recorded). Per engine:
useful tokens (responses up to and including their EOS) per second, and the
time against two bandwidth bounds (`roofline.ragged_roofline`): "ideal" (full
decode steps, each token reading only its own context) and "static" (the
bytes a static-shape loop reads: every slot's whole cache each step, for the
number of steps the slot schedule takes). Then the update step's MFU: one
jitted `entrl.rl.step` update (SENT loss, global scope, float32 master
weights, bfloat16 compute, remat full) on `--update-prompts` x 8 rows whose
response lengths are drawn from the rollout's, in micro-batches of
`--update-micro` rows, trimmed to 4 length buckets after the trainer's length
sort; MFU = model FLOPs of the real tokens (`roofline.update_flops`) / time /
the measured bf16 matmul rate (and / `--peak-tflops`, the datasheet rate).

Usage (on the GPU machine; prints JSON lines, `--out` also writes them):
    python benchmarks/bench_sampler_gpu.py --out results.jsonl
    python benchmarks/bench_sampler_gpu.py --ragged --out benchmarks/results/sampler_gpu_ragged.jsonl
    python benchmarks/bench_sampler_gpu.py --tiny     # seconds on a CPU: checks the script runs
    python benchmarks/bench_sampler_gpu.py --ragged --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback

import numpy as np
from roofline import decode_roofline, ragged_roofline, update_flops  # benchmarks/roofline.py (this script's directory)


def emit(row: dict, out) -> None:
    line = json.dumps(row, default=lambda o: o.item() if hasattr(o, "item") else str(o))  # numpy scalars
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


# ----------------------------------------------------------------------------
# Machine rates (measured in this run)
# ----------------------------------------------------------------------------
def measure_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of an on-device copy (read + write counted), median of `repeats`."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 1)  # an elementwise op XLA cannot elide: one read, one write
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def measure_matmul_rate(n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul, median of `repeats`."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------
def random_bf16_model(mcfg, seed: int = 0):
    """(graphdef, params) with random bf16 values drawn on the device (fast; values irrelevant to speed)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from entrl.models import Transformer

    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Transformer(mcfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)))
    flat = list(nnx.to_flat_state(abstract))

    # One small jit per distinct shape (about ten): a single jit over all ~340 tensors
    # took 3 min 10 s to compile on an H200.
    normal = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16),
                     static_argnums=1)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    vals = [jnp.ones(var.shape, jnp.bfloat16) if "norm" in ".".join(map(str, path)) else normal(k, tuple(var.shape))
            for k, (path, var) in zip(keys, flat)]
    params = nnx.from_flat_state([(path, var.replace(v)) for (path, var), v in zip(flat, vals)])
    return graphdef, params


def entrl_call(model, batch: int, prompt: int, new: int, vocab: int):
    import jax
    import jax.numpy as jnp

    from entrl.sampling import Sampler, SamplingConfig

    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=new, eos_ids=(), pad_id=0, cache_dtype="bfloat16")
    sampler = Sampler(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, vocab, size=(batch, prompt)), jnp.int32)
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)

    def call():
        ro = sampler.sample(model, ids, mask, key)
        jax.block_until_ready(ro.tokens)
        return ro

    return call


def hf_call(mcfg, batch: int, prompt: int, new: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hcfg = Qwen2Config(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
        num_key_value_heads=mcfg.num_kv_heads, max_position_embeddings=4096, rope_theta=mcfg.rope_theta,
        rms_norm_eps=mcfg.rms_norm_eps, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        hf = Qwen2ForCausalLM(hcfg).to(torch.bfloat16).eval()
    ids = torch.randint(1, mcfg.vocab_size, (batch, prompt), device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        hf.generate(ids[:, :8], max_new_tokens=4, **{**kw, "attention_mask": torch.ones_like(ids[:, :8])})

    def call():
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    return hf, call


def slot_schedule_steps(lengths, slots: int) -> int:
    """Decode steps of the slot sampler's schedule on one shard: free slots take rows in order."""
    import heapq

    free = [1] * slots  # the step at which each slot is next free
    heapq.heapify(free)
    end = 1
    for n in lengths:
        if n > 1:
            t = heapq.heappop(free) + n - 1
            end = max(end, t)
            heapq.heappush(free, t)
    return end - 1


def ragged_main(args, mcfg, out) -> None:
    """The paper-sized long-tailed rollout (slots vs one-shot) and the update's MFU; see the module docstring."""
    import jax
    import jax.numpy as jnp

    from entrl.sampling import Sampler, SamplingConfig

    gpu = jax.default_backend() == "gpu"
    bw = measure_bandwidth(4 << 30 if gpu else 64 << 20)
    rate = measure_matmul_rate(8192 if gpu else 512)
    emit(dict(kind="machine", copy_bandwidth_GBps=bw / 1e9, bf16_matmul_TFLOPs=rate / 1e12), out)
    t = time.perf_counter()
    model = random_bf16_model(mcfg)
    jax.block_until_ready(model[1])
    emit(dict(kind="model", params=sum(x.size for x in jax.tree.leaves(model[1])), init_s=time.perf_counter() - t),
         out)
    eos = tuple(range(1, 1 + max(1, round(args.eos_frac * mcfg.vocab_size))))
    rng = np.random.default_rng(1)
    ids_all = jnp.asarray(rng.integers(1, mcfg.vocab_size, size=(args.prompts, args.prompt)), jnp.int32)
    lengths_seen = None
    engines = [("slots", s, args.prompts) for s in args.slots] + [("one-shot", 0, args.oneshot_prompts)]
    for name, slots, prompts in engines:
        row = dict(kind="ragged", engine=name, slots=slots or prompts * args.n, prompts=prompts, n=args.n,
                   prompt=args.prompt, new=args.new, eos_ids=len(eos))
        try:
            cfg = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.new, eos_ids=eos, pad_id=0,
                                 cache_dtype="bfloat16", slots=slots)
            sampler = Sampler(cfg)
            ids = ids_all[:prompts]
            mask = jnp.ones_like(ids)
            row["kv_cache_GB"] = sampler.kv_cache_bytes(mcfg, prompts, args.prompt)["total"] / 1e9

            def call(sampler=sampler, ids=ids, mask=mask):
                ro = sampler.sample(model, ids, mask, jax.random.key(0))
                return np.asarray(ro.lengths)

            t = time.perf_counter()
            lengths = call()
            row["first_call_s"] = time.perf_counter() - t
            med, times = timed(call, args.repeats)
            rows = len(lengths)
            steps = slot_schedule_steps(lengths, slots) if slots else int(lengths.max()) - 1
            b = ragged_roofline(mcfg, lengths, args.prompt, prompts, slots or rows, bw, rate, elem=2, steps=steps)
            row.update(s=med, times=times, useful_tokens=int(lengths.sum()), mean_length=float(lengths.mean()),
                       p50_length=float(np.median(lengths)), p90_length=float(np.percentile(lengths, 90)),
                       truncated=float(np.mean(lengths == args.new)), useful_tok_s=int(lengths.sum()) / med,
                       decode_steps=steps, ideal_bound_s=b["ideal_s"], static_bound_s=b["static_s"],
                       fraction_of_ideal=b["ideal_s"] / med, fraction_of_static=b["static_s"] / med)  # fmt: skip
            lengths_seen = lengths if lengths_seen is None else lengths_seen
        except Exception as e:  # e.g. the one-shot KV cache does not fit: record it, keep going
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
        emit(row, out)
        jax.clear_caches()
    if args.update_prompts and lengths_seen is not None:
        emit(update_mfu(args, mcfg, model, lengths_seen, rate), out)


def update_mfu(args, mcfg, model, lengths_seen, rate) -> dict:
    """One jitted update on `--update-prompts` x n rows with the rollout's length distribution (module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from entrl.models import Transformer
    from entrl.rl import step as S

    row = dict(kind="update", prompts=args.update_prompts, n=args.n, micro=args.update_micro, prompt=args.prompt,
               new=args.new, length_buckets=4)
    try:
        rows = args.update_prompts * args.n
        rng = np.random.default_rng(2)
        lengths = rng.choice(lengths_seen, rows)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(
            mcfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")))
        params = jax.tree.map(lambda x: x.astype(jnp.float32), model[1])
        L = args.new
        mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
        order = S.length_order(lengths, 1, 1)
        batch = {"prompt_ids": rng.integers(1, mcfg.vocab_size, (rows, args.prompt)).astype(np.int32),
                 "prompt_mask": np.ones((rows, args.prompt), np.int32),
                 "resp_ids": np.where(mask > 0, rng.integers(1, mcfg.vocab_size, (rows, L)), 0).astype(np.int32),
                 "resp_len": lengths.astype(np.int32), "resp_mask": mask,
                 "old_logp": np.where(mask > 0, -12.0, 0).astype(np.float32),
                 "ref_logp": np.where(mask > 0, -12.0, 0).astype(np.float32),
                 "advantages": rng.standard_normal(rows).astype(np.float32)}
        batch = {k: jnp.asarray(v[order]) for k, v in batch.items()}
        opt = S.make_optimizer(lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0)
        settings = S.StepSettings(loss_name="sent", temperature=1.0, kl_coef=0.001,
                                  num_micro=rows // args.update_micro, length_buckets=4)
        update = S.make_update_fn(graphdef, opt, settings)
        state = [params, opt.init(params)]

        def call():
            p, o, m = update(state[0], state[1], batch, jax.random.key(0))
            state[0], state[1] = p, o
            return float(m["loss"])

        t = time.perf_counter()
        call()
        row["first_call_s"] = time.perf_counter() - t
        med, times = timed(call, 3)
        flops = update_flops(mcfg, [args.prompt] * rows, lengths)
        padded = update_flops(mcfg, [args.prompt] * rows, [L] * rows)
        row.update(s=med, times=times, model_TFLOPs=flops / 1e12, mean_length=float(lengths.mean()),
                   tokens=int(rows * args.prompt + lengths.sum()), mfu_measured_peak=flops / med / rate,
                   mfu_datasheet_peak=flops / med / (args.peak_tflops * 1e12),
                   untrimmed_model_TFLOPs=padded / 1e12)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
    return row


def timed(call, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--hf-only", action="store_true", help="only the transformers baseline")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy config on any backend (checks the script)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--ragged", action="store_true", help="the paper-sized long-tailed step (module docstring)")
    ap.add_argument("--prompts", type=int, default=256, help="--ragged: prompts of the step")
    ap.add_argument("--n", type=int, default=8, help="--ragged: samples per prompt")
    ap.add_argument("--eos-frac", type=float, default=0.001, help="--ragged: share of the vocabulary used as EOS")
    ap.add_argument("--slots", type=int, nargs="+", default=[256, 512], help="--ragged: slot counts to time")
    ap.add_argument("--oneshot-prompts", type=int, default=256, help="--ragged: prompts of the one-shot call")
    ap.add_argument("--update-prompts", type=int, default=16, help="--ragged: prompts of the update (0 = skip)")
    ap.add_argument("--update-micro", type=int, default=16, help="--ragged: rows per micro-batch of the update")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="--ragged: datasheet dense bf16 TFLOP/s")
    args = ap.parse_args(argv)

    import jax

    from entrl.models import PRESETS

    out = open(args.out, "a") if args.out else None
    mcfg = PRESETS["deepseek-r1-distill-qwen-1.5b"]
    if args.tiny:
        mcfg = dataclasses.replace(mcfg, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=16)
        args.batch, args.prompt, args.new = [b // 16 for b in args.batch], 16, 32
        if args.ragged:
            args.prompts, args.oneshot_prompts, args.slots, args.eos_frac = 8, 8, [8, 16], 0.05
            args.update_prompts, args.update_micro = 2, 4
    import flax

    emit(dict(kind="env", device=str(jax.devices()[0]), backend=jax.default_backend(), jax=jax.__version__,
              flax=flax.__version__), out)
    if args.ragged:
        ragged_main(args, mcfg, out)
        if out is not None:
            out.close()
        return 0
    gpu = jax.default_backend() == "gpu"
    bw = measure_bandwidth(4 << 30 if gpu else 64 << 20)
    rate = measure_matmul_rate(8192 if gpu else 512)
    emit(dict(kind="machine", copy_bandwidth_GBps=bw / 1e9, bf16_matmul_TFLOPs=rate / 1e12), out)

    if not args.hf_only:
        t = time.perf_counter()
        model = random_bf16_model(mcfg)
        jax.block_until_ready(model[1])
        n_params = sum(x.size for x in jax.tree.leaves(model[1]))
        emit(dict(kind="model", params=n_params, init_s=time.perf_counter() - t), out)

    for batch in args.batch:
        row = dict(kind="case", batch=batch, prompt=args.prompt, new=args.new)
        try:
            if args.hf_only:
                raise RuntimeError("--hf-only")
            call = entrl_call(model, batch, args.prompt, args.new, mcfg.vocab_size)
            t = time.perf_counter()
            ro = call()
            row["entrl_first_call_s"] = time.perf_counter() - t  # compile + one run
            assert ro.tokens.shape == (batch, args.new) and bool(np.all(np.asarray(ro.lengths) == args.new))
            med, times = timed(call, args.repeats)
            pre = entrl_call(model, batch, args.prompt, 1, mcfg.vocab_size)
            pre()
            pre_s, _ = timed(pre, args.repeats)
            b = decode_roofline(mcfg, batch, args.prompt, args.new, bw, rate, elem=2)
            row.update(entrl_s=med, entrl_times=times, entrl_prefill_s=pre_s,
                       entrl_tok_s=batch * args.new / med,
                       entrl_decode_tok_s=batch * (args.new - 1) / max(med - pre_s, 1e-9),
                       bound_s=b["seconds"], bound_decode_mem_s=b["decode_mem_s"],
                       bound_decode_flop_s=b["decode_flop_s"], bound=b["bound"],
                       mid_step_GB=b["step_bytes"] / 1e9, fraction_of_bound=b["seconds"] / med,
                       decode_fraction_of_mem_bound=b["decode_mem_s"] / max(med - pre_s, 1e-9))
        except Exception as e:  # keep the other cases and the baseline
            row["entrl_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        emit(row, out)
        if not args.no_hf:
            try:
                import torch

                hf, hcall = hf_call(mcfg, batch, args.prompt, args.new)
                hmed, htimes = timed(hcall, args.hf_repeats)
                row.update(hf_s=hmed, hf_times=htimes, hf_tok_s=batch * args.new / hmed,
                           hf_fraction_of_bound=row.get("bound_s", float("nan")) / hmed)
                if "entrl_tok_s" in row:
                    row["ratio_entrl_over_hf"] = row["entrl_tok_s"] / row["hf_tok_s"]
                del hf
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception as e:
                row["hf_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            emit(row, out)
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
