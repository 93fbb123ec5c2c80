"""Length-aware update batches (issue 16): the update and log-prob passes with micro-batches run at full
length vs trimmed to length buckets, unsorted and sorted by length within each shard.

The update's arrays are padded to `max_new_tokens` (L); with `train.length_buckets` K > 1 each micro-batch
runs the model only up to its longest response, rounded up to ceil(L k / K) (`entrl.rl.step`), and the
trainer first sorts each shard's rows of each mini-batch by length (`length_order`), so the micro-batches
of similar rows are short together. Both are exact (tests/test_step.py); this measures what they save.

Two synthetic batches on one CPU device, a Qwen2-layout model of the demo's width (hidden 128, 4 layers,
4 heads) with a 32k vocabulary, the `sent` loss, global selection scope, one mini-batch of `--rows` rows in
micro-batches of `--micro` rows:

- "long-tailed": prompt 64, L = 512, lengths ~ geometric (mean 100) capped at L, as from the sampler's
  long-tailed workload (benchmarks/bench_sampler.py --ragged);
- "demo-like": prompt 8, L = 32, lengths uniform in [16, 32] (the demo's responses average ~24 tokens,
  a few reach the cap), one micro-batch per mini-batch as in configs/demo.yaml.

Reported per variant: the jitted update's time (one optimizer step on the mini-batch) and the log-prob
pass's time (`compute_logprobs` of the same rows), best of `--repeats` calls interleaved across variants,
process CPU time alongside wall time (the box may be shared), and the compile time of each program
(K branches compile K forward+backward programs).

Usage:
    python benchmarks/bench_update_lengths.py
    python benchmarks/bench_update_lengths.py --batches long-tailed --rows 64 --micro 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

VOCAB = 32_000


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def make_batch(kind: str, rows: int, seed: int = 0) -> tuple[dict, int]:
    """A mini-batch of `rows` rows: (batch dict of numpy arrays, response length L)."""
    rng = np.random.default_rng(seed)
    if kind == "long-tailed":
        plen, max_len = 64, 512
        lengths = np.minimum(rng.geometric(0.01, rows), max_len)
    else:
        plen, max_len = 8, 32
        lengths = rng.integers(16, max_len + 1, rows)
    mask = (np.arange(max_len)[None] < lengths[:, None]).astype(np.float32)
    batch = {
        "prompt_ids": rng.integers(1, VOCAB, (rows, plen)).astype(np.int32),
        "prompt_mask": np.ones((rows, plen), np.int32),
        "resp_ids": np.where(mask > 0, rng.integers(1, VOCAB, (rows, max_len)), 0).astype(np.int32),
        "resp_len": lengths.astype(np.int32),
        "resp_mask": mask,
        "old_logp": np.where(mask > 0, -10.4 + 0.05 * rng.standard_normal((rows, max_len)), 0).astype(np.float32),
        "ref_logp": np.where(mask > 0, -10.4 + 0.05 * rng.standard_normal((rows, max_len)), 0).astype(np.float32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }
    return batch, max_len


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", default=["long-tailed", "demo-like"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8, help="rows per micro-batch of the long-tailed batch")
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from entrl import token_stats as TS
    from entrl.models import ModelConfig, create_model
    from entrl.rl import step as S

    mcfg = ModelConfig(arch="qwen2", vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_layers=4,
                       num_heads=4, num_kv_heads=4, head_dim=32, qkv_bias=True, tie_word_embeddings=True)
    graphdef, params = nnx.split(create_model(mcfg, seed=0))
    opt = S.make_optimizer(lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0)
    print(f"# 1 CPU device of {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    header = ("batch", "variant", "mean / max length", "update s", "update cpu s", "vs full", "log-prob s",
              "log-prob cpu s", "vs full", "compile s (update + log-prob)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    out = []
    for kind in args.batches:
        batch, max_len = make_batch(kind, args.rows)
        micro = args.micro if kind == "long-tailed" else args.rows
        num_micro = args.rows // micro
        order = S.length_order(batch["resp_len"], 1, 1)
        variants = {"full length": (1, None), f"{args.buckets} buckets": (args.buckets, None),
                    f"{args.buckets} buckets, sorted": (args.buckets, order)}
        if num_micro == 1:
            del variants[f"{args.buckets} buckets, sorted"]  # one micro-batch: order is irrelevant
        calls, compile_s = {}, {}
        for name, (k, perm) in variants.items():
            mb = {key: jnp.asarray(v if perm is None else v[perm]) for key, v in batch.items()}
            settings = S.StepSettings(loss_name="sent", temperature=1.0, kl_coef=0.001, num_micro=num_micro,
                                      length_buckets=k)
            update = S.make_update_fn(graphdef, opt, settings)
            state = [jax.tree.map(jnp.copy, params), opt.init(params)]

            def upd(update=update, state=state, mb=mb):
                p, o, m = update(state[0], state[1], mb, jax.random.key(0))
                state[0], state[1] = p, o
                return jax.block_until_ready(m["loss"])

            def logp(mb=mb, k=k, num_micro=num_micro):
                return jax.block_until_ready(TS.compute_logprobs(
                    graphdef, params, mb, temperature=1.0, num_micro=num_micro, chunk_size=512, length_buckets=k))

            first_u, first_l = _timed(upd)[1], _timed(logp)[1]
            calls[name] = (upd, logp)
            compile_s[name] = (first_u, first_l)
        best = {name: [float("inf")] * 4 for name in variants}
        for _ in range(args.repeats):
            for name, (upd, logp) in calls.items():
                _, uw, uc = _timed(upd)
                _, lw, lc = _timed(logp)
                best[name] = [min(a, b) for a, b in zip(best[name], (uw, uc, lw, lc))]
        full = best["full length"]
        lengths = batch["resp_len"]
        for name in variants:
            uw, uc, lw, lc = best[name]
            row = dict(batch=kind, variant=name, rows=args.rows, micro=micro, max_len=max_len,
                       mean_len=float(lengths.mean()), update_s=uw, update_cpu_s=uc, logprob_s=lw, logprob_cpu_s=lc,
                       update_vs_full=full[0] / uw, logprob_vs_full=full[2] / lw,
                       compile_update_s=compile_s[name][0] - uw, compile_logprob_s=compile_s[name][1] - lw)
            out.append(row)
            cells = [kind, name, f"{lengths.mean():.0f} / {lengths.max()} of {max_len}", f"{uw:.3f}", f"{uc:.3f}",
                     f"{full[0] / uw:.2f}x", f"{lw:.3f}", f"{lc:.3f}", f"{full[2] / lw:.2f}x",
                     f"{row['compile_update_s']:.0f} + {row['compile_logprob_s']:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
