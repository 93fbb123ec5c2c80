"""entrl.colab: device description from what JAX reports, and the run chosen for it (faked devices)."""

import dataclasses

import pytest

from entrl import colab
from entrl import config as C
from entrl.build import check_batch_layout
from entrl.colab import GiB, describe_devices, plan_run

R1, QWEN = colab.MODELS["r1-1.5b"].name, colab.MODELS["qwen-0.5b"].name


@dataclasses.dataclass
class FakeDevice:
    """What a jax Device exposes: platform, device_kind, memory_stats() (None where the backend has none)."""

    platform: str
    device_kind: str
    bytes_limit: int | None = None

    def memory_stats(self):
        return {"bytes_limit": self.bytes_limit, "bytes_in_use": 0} if self.bytes_limit else None


DEVICES = {
    "cpu": [FakeDevice("cpu", "cpu")],
    "t4": [FakeDevice("gpu", "Tesla T4")],  # no memory_stats: the table says 15 GiB
    "a100-40": [FakeDevice("gpu", "NVIDIA A100-SXM4-40GB", int(0.75 * 40e9))],  # JAX's default 75% limit
    "a100-80": [FakeDevice("gpu", "NVIDIA A100-SXM4-80GB", int(0.75 * 80e9))],
    "v5e-1": [FakeDevice("tpu", "TPU v5 lite", 16 * GiB)],
    "v5p-4": [FakeDevice("tpu", "TPU v5")] * 4,  # no memory_stats: 95 GiB per chip from the table
}

# (devices, lora_available) -> (mode, model, lora, prompts per step, new tokens)
EXPECTED = {
    ("cpu", False): ("demo", "demo", False, 0, 0),
    ("cpu", True): ("demo", "demo", False, 0, 0),
    ("t4", False): ("model", QWEN, False, 16, 2048),  # 1.5B with all weights needs ~22 GiB
    ("t4", True): ("model", R1, True, 16, 1024),
    ("a100-40", False): ("model", R1, False, 16, 1024),
    ("a100-40", True): ("model", R1, False, 16, 1024),  # all weights fit: no LoRA
    ("a100-80", False): ("model", R1, False, 32, 2048),
    ("v5e-1", False): ("model", QWEN, False, 32, 2048),
    ("v5e-1", True): ("model", R1, True, 16, 2048),
    ("v5p-4", False): ("model", R1, False, 32, 2048),
}


def test_describe_devices():
    assert describe_devices(DEVICES["t4"]) == colab.DeviceInfo("gpu", "Tesla T4", 1, 15 * GiB, "table")
    assert describe_devices(DEVICES["a100-40"]).memory_source == "memory_stats"
    assert describe_devices(DEVICES["v5p-4"]) == colab.DeviceInfo("tpu", "TPU v5", 4, 95 * GiB, "table")
    assert describe_devices([FakeDevice("tpu", "TPU v6 lite")]).memory_bytes == 32 * GiB
    assert describe_devices([FakeDevice("gpu", "Mystery GPU")]).memory_source == "unknown"
    real = describe_devices()  # this machine, as JAX sees it (the tests run on CPU)
    assert real.platform == "cpu" and real.count >= 1


@pytest.mark.parametrize("name, lora", sorted(EXPECTED))
def test_plan_fits_the_device(name, lora):
    info = describe_devices(DEVICES[name])
    plan = plan_run(info, lora_available=lora)
    assert (plan.mode, plan.model, plan.lora, plan.prompts_per_step, plan.max_new_tokens) == EXPECTED[name, lora]
    if plan.mode == "demo":
        assert plan.overrides == ()
        return
    assert plan.estimate_bytes <= info.memory_bytes * (1 - colab.ACTIVATION_RESERVE)
    assert f"model.path={plan.model}" in plan.overrides and f"mesh.fsdp={info.count}" in plan.overrides
    assert ("model.lora_rank=16" in plan.overrides) == plan.lora
    if plan.lora and not colab.lora_supported():
        return  # LoRA settings arrive with LoRA; the plan is only offered when they exist
    cfg = C.load_config(None, list(plan.overrides))  # a valid config, whose batch splits over the devices
    check_batch_layout(cfg, shards=info.count)  # raises ConfigError when the batch does not split


def test_plan_explains_itself():
    small = plan_run(describe_devices([FakeDevice("gpu", "GTX 1050", 2 * GiB)]))
    assert small.mode == "demo" and "no real model fits" in small.reason
    t4 = plan_run(describe_devices(DEVICES["t4"]))
    assert "Tesla T4" in t4.reason and "too big: " + R1 in t4.reason
    assert plan_run(describe_devices(DEVICES["a100-80"]), force_demo=True).mode == "demo"
    assert "memory unknown" in plan_run(describe_devices([FakeDevice("gpu", "Mystery GPU")])).reason
    # The memory arithmetic of the module docstring: 10 bytes per parameter with all weights.
    assert colab.state_bytes(colab.MODELS["r1-1.5b"], lora=False) == pytest.approx(17.8e9)
