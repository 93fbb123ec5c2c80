"""Test-wide setup: 8 fake CPU devices (for sharding tests) and a persistent compile cache.

Both must be configured before anything touches a JAX device, so they live here.
"""

import os
import sys
from pathlib import Path

# The concurrency-optimised scheduler lets the 8 fake devices run independent collectives in different
# orders; an executable loaded from the persistent compile cache below then deadlocked in XLA:CPU's
# rendezvous (the same program compiled fresh did not). The plain scheduler runs them in one order.
# Most of the suite's CPU time is XLA:CPU compiling tiny programs that then run for milliseconds, so LLVM
# does not optimise them (`xla_backend_optimization_level=0`, as `entrl plan` compiles) and loop fusions go
# through XLA:CPU's older LLVM-IR emitters instead of its MLIR fusion emitters
# (`xla_cpu_use_fusion_emitters=false`: half the compile time of a training step's programs; the suite went
# from 860 to 609 s on the 2-core box, the same 760 tests passing). The HLO passes, buffer assignment and
# floating-point semantics are the same (no fast-math either way), the machine code is slower (benchmarks do
# not import this file: they compile with XLA's defaults). A jaxlib that drops one of these flags refuses to
# start (XLA rejects unknown flags): remove it here.
CPU_TEST_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CPU_TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["fake_gcs"]  # the `fake_gcs` fixture (tests/fake_gcs.py) for every test module

_CACHE = Path(os.environ.get("ENTRL_TEST_COMPILE_CACHE", Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ENTRL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the real benchmark and training sets (never copied into the repo)."""
    if not (SHARED_DATA / "aime24.jsonl").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


sys.path.insert(0, str(REPO))

# The longest modules first (from --durations on the 2-core box), the rest in file order. Each worker of
# pytest-xdist (`--dist loadfile`, pyproject) takes the next whole module when it is free, so a long
# module left to the end would run alone while the other workers idle.
_LONGEST_FIRST = ("test_trainer.py", "test_multihost.py", "test_presets.py", "test_cli_errors.py", "test_lora.py",
                  "test_step.py", "test_notebooks.py", "test_sampling.py", "test_plan.py", "test_ablate.py",
                  "test_demo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
