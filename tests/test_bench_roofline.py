"""The sampler benchmarks' roofline (benchmarks/roofline.py) against hand-counted bytes and FLOPs."""

import sys
from pathlib import Path

import pytest

from entrl.models import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from roofline import decode_roofline  # noqa: E402

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
