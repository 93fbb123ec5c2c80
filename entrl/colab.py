"""Which accelerator a notebook runs on, how much memory it has, and a run that fits it.

Used by the notebooks (Colab, Kaggle, a TPU VM, a workstation) to choose between the CPU demo and a
short real-model run, and to size that run.

Design decisions:
- Devices are what JAX sees: `jax.devices()`, each device's `platform` (`cpu`, `gpu`, `tpu`) and
  `device_kind` (`"Tesla T4"`, `"NVIDIA A100-SXM4-40GB"`, `"TPU v5 lite"`, `"TPU v5"`). No device
  files or environment variables: current TPU VMs (v4, v5e, v5p, v6e) do not expose `/dev/accel*`,
  and `COLAB_TPU_ADDR` belonged to the retired TPU-node runtime.
- Memory per device is `device.memory_stats()["bytes_limit"]` where the backend reports it (GPU and
  TPU; on a GPU that is the allocator's limit, by default 75% of the card, which is what a run can
  use). Where it does not, `KNOWN_MEMORY` (device kind -> bytes per device, from the vendors' specs)
  is the fallback; a kind in neither is treated as too small for a real model (the demo runs).
- The run is chosen by an explicit memory estimate, not by device names. For a model of P
  parameters in bfloat16, full-parameter RL holds weights, gradients, two AdamW moments and the
  reference model: 2 + 2 + 4 + 2 = 10 bytes per parameter (e.g. 17.8 GB for the 1.78B
  DeepSeek-R1-Distill-Qwen-1.5B, more than a 16 GB T4 or TPU v5e chip has). With LoRA the frozen base
  is 2 bytes per parameter, the adapters and their optimizer state about 0.2 more, and the reference
  is the base with the adapters off (no second copy). The state is sharded over all devices (FSDP).
  The sampler's KV cache is (prompts x n / devices) x (prompt bucket + new tokens) x the model's KV
  bytes per token, and a fifth of the memory is kept for activations (layers are rematerialised).
  The first (model, batch) in preference order whose sum fits is the plan: the paper's 1.5B model
  fully trained, then the 1.5B model with LoRA, then Qwen2.5-0.5B-Instruct fully trained, each with
  32 or 16 prompts per step and 2048 or 1024 new tokens; nothing fits -> the CPU demo.
- LoRA is offered only when `lora_available=True` (`lora_supported()` tells whether this entrl has
  the `model.lora_rank` setting): the plan never names a setting the installed entrl would reject.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from entrl.config import ModelSection

GiB = 1024 ** 3

# Device kind pattern -> memory per device in bytes (vendor specs), when `memory_stats()` says nothing.
# First match wins, so the more specific patterns come first.
KNOWN_MEMORY: tuple[tuple[str, int], ...] = (
    (r"TPU v2", 8 * GiB),
    (r"TPU v3", 16 * GiB),
    (r"TPU v4", 32 * GiB),
    (r"TPU v5 ?lite|TPU v5e", 16 * GiB),
    (r"TPU v5p?$", 95 * GiB),
    (r"TPU v6 ?lite|TPU v6e", 32 * GiB),
    (r"80 ?GB|H100|H800", 80 * 10 ** 9),
    (r"H200", 141 * 10 ** 9),
    (r"40 ?GB", 40 * 10 ** 9),
    (r"A100", 40 * 10 ** 9),
    (r"L4\b", 24 * 10 ** 9),
    (r"A10G?\b", 24 * 10 ** 9),
    (r"V100.*32", 32 * 10 ** 9),
    (r"V100|P100", 16 * 10 ** 9),
    (r"T4\b", 15 * GiB),  # 16 GB card, 15 GiB usable
)

ACTIVATION_RESERVE = 0.2  # share of device memory kept for activations and XLA workspace
N_SAMPLES = 8  # rollout.n of every plan (the paper's group size)
PROMPT_BUCKET = 512  # longest prompt kept (data.max_prompt_len) in the real-model plans


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    platform: str  # cpu | gpu | tpu
    kind: str  # jax device_kind of the first device
    count: int  # devices visible to this process
    memory_bytes: int | None  # per device; None when unknown
    memory_source: str  # memory_stats | table | host (CPU: the machine's RAM) | unknown


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # hub id
    params: float  # parameter count
    kv_bytes_per_token: int  # bfloat16 K and V of all layers, per token


MODELS = {
    "r1-1.5b": ModelSpec("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9, 28 * 2 * 2 * 128 * 2),
    "qwen-0.5b": ModelSpec("Qwen/Qwen2.5-0.5B-Instruct", 0.494e9, 24 * 2 * 2 * 64 * 2),
}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    mode: str  # demo | model (a real model from the hub)
    model: str  # hub id, or "demo"
    lora: bool  # train LoRA adapters instead of all weights
    prompts_per_step: int  # prompts per RL step
    max_new_tokens: int  # response budget
    estimate_bytes: int  # estimated state + KV cache per device, activations not included (0 for the demo)
    reason: str  # one line: why this plan
    overrides: tuple[str, ...]  # dotted config overrides that realise it (empty for the demo)


def _memory(device: Any) -> tuple[int | None, str]:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends raise different types when they have no stats)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "memory_stats"
    for pattern, size in KNOWN_MEMORY:
        if re.search(pattern, str(device.device_kind), re.IGNORECASE):
            return size, "table"
    return None, "unknown"


def describe_devices(devices: Sequence[Any] | None = None) -> DeviceInfo:
    """Platform, kind, count and per-device memory of `devices` (default: `jax.devices()`)."""
    if devices is None:
        devices = jax.devices()
    first = devices[0]
    if first.platform == "cpu":
        return DeviceInfo("cpu", str(first.device_kind), len(devices), _host_memory(), "host")
    memory, source = _memory(first)
    return DeviceInfo(first.platform, str(first.device_kind), len(devices), memory, source)


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def lora_supported() -> bool:
    """Whether this entrl has LoRA settings (`model.lora_rank`)."""
    return "lora_rank" in {f.name for f in dataclasses.fields(ModelSection)}


def state_bytes(spec: ModelSpec, *, lora: bool) -> float:
    """Weights + gradients + AdamW moments + reference model, bfloat16 (see the module docstring)."""
    return spec.params * (2.2 if lora else 10.0)


def kv_bytes(spec: ModelSpec, prompts: int, new_tokens: int) -> float:
    return prompts * N_SAMPLES * (PROMPT_BUCKET + new_tokens) * spec.kv_bytes_per_token


def _demo(reason: str) -> RunPlan:
    return RunPlan("demo", "demo", False, 0, 0, 0, reason, ())


def plan_run(info: DeviceInfo, *, lora_available: bool = False, force_demo: bool = False) -> RunPlan:
    """The run that fits `info` (see the module docstring); `lora_available` allows LoRA plans."""
    if force_demo:
        return _demo("demo requested")
    if info.platform == "cpu":
        return _demo("CPU only: the embedded demo (a real model would take hours per step)")
    if info.memory_bytes is None:
        return _demo(f"{info.kind}: memory unknown (no memory_stats, not in KNOWN_MEMORY); running the demo")
    budget = info.memory_bytes * (1 - ACTIVATION_RESERVE)
    candidates = [("r1-1.5b", False)] + ([("r1-1.5b", True)] if lora_available else []) + [("qwen-0.5b", False)]
    tried = []
    for key, lora in candidates:
        spec = MODELS[key]
        for prompts, new in ((32, 2048), (16, 2048), (16, 1024)):
            if prompts % info.count:
                continue
            per_device = (state_bytes(spec, lora=lora) + kv_bytes(spec, prompts, new)) / info.count
            if per_device <= budget:
                how = "LoRA" if lora else "all weights"
                reason = (f"{info.count} x {info.kind} with {info.memory_bytes / GiB:.1f} GiB each "
                          f"({info.memory_source}): {spec.name} ({how}), {prompts} prompts x {N_SAMPLES} samples, "
                          f"{new} new tokens; state and KV cache about {per_device / GiB:.1f} GiB per device")
                if tried:
                    reason += f"; too big: {tried[0]}"
                return RunPlan("model", spec.name, lora, prompts, new, int(per_device), reason,
                               _overrides(spec, lora, prompts, new, info))
        tried.append(f"{spec.name} ({'LoRA' if lora else 'all weights'}) needs "
                     f"{(state_bytes(spec, lora=lora) + kv_bytes(spec, 16, 1024)) / info.count / GiB:.1f} GiB "
                     f"per device before activations")
    return _demo(f"{info.count} x {info.kind} with {info.memory_bytes / GiB:.1f} GiB each: no real model fits "
                 f"({tried[-1]}); running the demo")


def _overrides(spec: ModelSpec, lora: bool, prompts: int, new: int, info: DeviceInfo) -> tuple[str, ...]:
    micro = 2 if info.memory_bytes and info.memory_bytes >= 60 * GiB else 1  # sequences per device per pass
    out = [f"model.path={spec.name}", "model.dtype=bfloat16", "model.remat=full", "rollout.cache_dtype=bfloat16",
           f"rollout.n={N_SAMPLES}", f"rollout.max_new_tokens={new}", f"rollout.prompt_buckets=[{PROMPT_BUCKET}]",
           f"data.max_prompt_len={PROMPT_BUCKET}", f"train.prompts_per_step={prompts}",
           f"train.minibatch_prompts={prompts // 2}", f"train.microbatch_per_shard={micro}",
           "mesh.data=1", f"mesh.fsdp={info.count}", "mesh.tensor=1"]
    if lora:
        out += ["model.lora_rank=16", "model.lora_alpha=32"]
    return tuple(out)
