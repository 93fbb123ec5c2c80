"""Roofline of one greedy KV-cache `generate` call, shared by the sampler benchmarks.

Counts, from an `entrl.models.ModelConfig`:

- prefill: FLOPs of B * P tokens through every matmul, plus causal attention
  (half of the P x P score and value products), at the measured matmul rate;
- each decode step i (1 <= i < new; token 0 comes from the prefill), context
  P + i: the bytes that must be read, i.e. every matmul weight (the embedding
  table is a gather of B rows and is not counted; the unembedding, tied or
  not, is) plus the K/V cache of the B rows at the current context, over the
  measured memory bandwidth; and the FLOPs, 2 * B * matmul params plus the
  attention products, over the measured matmul rate. A step costs the larger
  of the two.

The bound is a lower bound on time: it assumes weights and cache stream from
memory once per step at full bandwidth and matmuls run at the large-matmul
rate. Norms, RoPE, softmax and sampling are not counted.
"""

from __future__ import annotations


def decode_roofline(cfg, batch: int, prompt: int, new: int, bw: float, rate: float, elem: int) -> dict:
    """Lower-bound seconds of prefill + `new` - 1 decode steps, and the counts behind them.

    Args:
      cfg: the model's `ModelConfig` (hidden_size, num_layers, num_heads,
        num_kv_heads, head_dim, intermediate_size, vocab_size).
      batch, prompt, new: rows, prompt tokens, new tokens per row.
      bw: memory bandwidth in bytes/s; rate: matmul FLOP/s.
      elem: bytes per weight and per cached K/V element (4 float32, 2 bfloat16).

    Returns a dict: seconds (the bound), prefill_s, decode_mem_s and
    decode_flop_s (the decode steps' byte and FLOP times, each summed alone),
    bound ("memory" or "compute", whichever sum is larger), and step_bytes /
    step_flops of the middle decode step.
    """
    D, L, H, K, Dh, F, V = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, cfg.vocab_size)  # fmt: skip
    layer_params = 2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F  # q and o, k and v, gate / up / down
    matmul_params = L * layer_params + D * V  # + the unembedding
    weight_bytes = elem * matmul_params
    kv_bytes_per_token = elem * 2 * L * K * Dh  # k and v of every layer
    attn_flops_per_ctx = 4 * L * H * Dh  # q.k and p.v, 2 FLOPs each, per query per context slot
    prefill_flops = batch * prompt * (2 * matmul_params + attn_flops_per_ctx * prompt / 2)
    t_mem = t_flop = t_step = 0.0
    mid = dict(step_bytes=0, step_flops=0)
    for i in range(1, new):
        ctx = prompt + i
        nbytes = weight_bytes + batch * ctx * kv_bytes_per_token
        flops = batch * (2 * matmul_params + attn_flops_per_ctx * ctx)
        t_mem += nbytes / bw
        t_flop += flops / rate
        t_step += max(nbytes / bw, flops / rate)
        if i == new // 2:
            mid = dict(step_bytes=nbytes, step_flops=flops)
    t_prefill = prefill_flops / rate
    return dict(seconds=t_prefill + t_step, prefill_s=t_prefill, decode_mem_s=t_mem, decode_flop_s=t_flop,
                bound="memory" if t_mem >= t_flop else "compute", **mid)  # fmt: skip
