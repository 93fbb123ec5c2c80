"""Rooflines of KV-cache sampling, shared by the sampler benchmarks.

`decode_roofline`: one greedy `generate` call where every row runs to the end.
`ragged_roofline`: responses of given lengths decoded at most `slots` rows at a
time (continuous batching), under two byte counts (see its docstring).

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


def _counts(cfg, elem: int) -> tuple[int, int, int]:
    """(matmul params incl. the unembedding, K/V bytes per cached token, attention FLOPs per query per slot)."""
    D, L, H, K, Dh, F, V = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, cfg.vocab_size)  # fmt: skip
    return L * (2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F) + D * V, elem * 2 * L * K * Dh, 4 * L * H * Dh


def ragged_roofline(cfg, lengths, prompt: int, prompts: int, slots: int, bw: float, rate: float, elem: int,
                    cache_slots: int | None = None, steps: int | None = None) -> dict:
    """Lower-bound seconds to sample responses of the given `lengths` with at most `slots` rows at a time.

    Response token 0 of a row comes from the prefill (of `prompts` prompts of `prompt` tokens); each later
    token i is one decode step of its row, reading context prompt + i. Two bounds:

    - "ideal": every decode step is full (ceil(sum(len - 1) / slots) steps, each reading the weights
      once) and each token reads only its own context's K/V;
    - "static": what a static-shape sampler reads: `steps` decode steps (default: the ideal count), each
      reading the weights and, for all `slots` rows, a K/V cache of `cache_slots` slots (default
      prompt + max(lengths) - 1: the full cache).

    Each adds the prefill's FLOP time; a step costs at least its bytes over `bw` and its FLOPs over
    `rate`, so the sums of bytes and of FLOPs bound the total from below (max of the two sums).
    Returns a dict: ideal_s, static_s, prefill_s, ideal_bytes, static_bytes, decode_flops, steps_ideal,
    useful_tokens.
    """
    matmul_params, kv_per_token, attn_per_ctx = _counts(cfg, elem)
    lengths = [int(x) for x in lengths]
    useful = sum(lengths)
    decode_tokens = sum(max(x - 1, 0) for x in lengths)
    ctx_sum = sum((x - 1) * prompt + (x - 1) * x // 2 for x in lengths if x > 1)  # sum over i < x of prompt + i
    steps_ideal = -(-decode_tokens // slots)
    flops = 2 * matmul_params * decode_tokens + attn_per_ctx * ctx_sum
    prefill_flops = prompts * prompt * (2 * matmul_params + attn_per_ctx * prompt / 2)
    prefill_s = prefill_flops / rate
    ideal_bytes = steps_ideal * elem * matmul_params + kv_per_token * ctx_sum
    cache_slots = prompt + max(lengths) - 1 if cache_slots is None else cache_slots
    steps = steps_ideal if steps is None else steps
    static_bytes = steps * (elem * matmul_params + slots * cache_slots * kv_per_token)
    return dict(ideal_s=prefill_s + max(ideal_bytes / bw, flops / rate),
                static_s=prefill_s + max(static_bytes / bw, flops / rate), prefill_s=prefill_s,
                ideal_bytes=ideal_bytes, static_bytes=static_bytes, decode_flops=flops, steps_ideal=steps_ideal,
                useful_tokens=useful)  # fmt: skip


def update_flops(cfg, prompt_lengths, response_lengths) -> float:
    """Model FLOPs of one forward + backward over the given sequences: 6 x matmul params per token plus
    causal attention (3 x 4 x layers x heads x Dh per query per earlier position); the unembedding
    included, rematerialisation not (the usual MFU convention)."""
    matmul_params, _, attn_per_ctx = _counts(cfg, 2)
    total = 0.0
    for p, r in zip(prompt_lengths, response_lengths):
        t = int(p) + int(r)
        total += 6 * matmul_params * t + 3 * attn_per_ctx * t * (t + 1) / 2
    return total
