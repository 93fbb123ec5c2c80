"""The sampler benchmarks' roofline (benchmarks/roofline.py) against hand-counted bytes and FLOPs."""

import sys
from pathlib import Path

import pytest

from entrl.models import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from roofline import decode_roofline, ragged_roofline, update_flops  # noqa: E402

# L=1, D=2, H=K=1, Dh=2, F=2, V=4: per layer q, o, k, v are 2x2 (16 params), gate/up/down 2x2 (12);
# matmul params 28 + the unembedding 8 = 36.
TINY = ModelConfig(arch="qwen2", vocab_size=4, hidden_size=2, intermediate_size=2, num_layers=1, num_heads=1,
                   num_kv_heads=1, head_dim=2)  # fmt: skip


def test_one_decode_step_by_hand():
    r = decode_roofline(TINY, batch=1, prompt=1, new=2, bw=1.0, rate=1.0, elem=4)
    # prefill: 2 * 36 matmul FLOPs + causal attention 4 * Dh * P^2 / 2 = 4.
    assert r["prefill_s"] == 76
    # step 1, context 2: bytes 4 * 36 weights + 2 slots * (k and v) * Dh * 4 bytes = 144 + 32;
    # FLOPs 2 * 36 + 4 * Dh * 2 = 88; the step costs the larger (memory).
    assert (r["step_bytes"], r["step_flops"]) == (176, 88)
    assert (r["decode_mem_s"], r["decode_flop_s"]) == (176, 88)
    assert r["seconds"] == 76 + 176 and r["bound"] == "memory"


def test_sums_over_steps_and_scales_with_rates():
    r = decode_roofline(TINY, batch=3, prompt=4, new=5, bw=2.0, rate=8.0, elem=2)
    steps = range(1, 5)
    mem = sum((2 * 36 + 3 * (4 + i) * 2 * 2 * 2) / 2.0 for i in steps)
    flop = sum(3 * (2 * 36 + 8 * (4 + i)) / 8.0 for i in steps)
    assert r["decode_mem_s"] == pytest.approx(mem) and r["decode_flop_s"] == pytest.approx(flop)
    per_step = sum(max((2 * 36 + 3 * (4 + i) * 8) / 2.0, 3 * (72 + 8 * (4 + i)) / 8.0) for i in steps)
    assert r["seconds"] == pytest.approx(3 * 4 * (72 + 8 * 4 / 2) / 8.0 + per_step)


def test_ragged_bounds_by_hand():
    """Two rows of lengths 3 and 1 (token 0 of each from the prefill), prompt 2, 2 slots, elem 4."""
    r = ragged_roofline(TINY, [3, 1], prompt=2, prompts=2, slots=2, bw=1.0, rate=1.0, elem=4)
    # Decode tokens: row 0's tokens 1 and 2 (contexts 3 and 4); row 1 none. 2 tokens / 2 slots = 1 step.
    assert r["steps_ideal"] == 1 and r["useful_tokens"] == 4
    assert r["decode_flops"] == 2 * (2 * 36) + 8 * (3 + 4)
    assert r["ideal_bytes"] == 1 * 4 * 36 + 16 * (3 + 4)  # weights once + K/V of 2 slots x 2 x Dh x 4 bytes
    assert r["prefill_s"] == 2 * 2 * (72 + 8 * 2 / 2)
    # Static shapes: 2 slots x a 4-slot cache (prompt + 3 - 1) read every step; 5 steps if told so.
    s = ragged_roofline(TINY, [3, 1], prompt=2, prompts=2, slots=2, bw=1.0, rate=1.0, elem=4, steps=5)
    assert s["static_bytes"] == 5 * (4 * 36 + 2 * 4 * 16)
    assert s["ideal_s"] == r["prefill_s"] + max(r["ideal_bytes"], r["decode_flops"])
    assert s["static_s"] == r["prefill_s"] + max(s["static_bytes"], r["decode_flops"])


def test_update_flops_by_hand():
    # One sequence of 1 prompt + 2 response tokens: 6 * 36 per token, attention 3 * 8 * (1 + 2 + 3).
    assert update_flops(TINY, [1], [2]) == 3 * 6 * 36 + 3 * 8 * 6
