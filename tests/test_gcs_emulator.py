"""A whole run on `gs://`, checkpoint arrays included, against a local GCS emulator.

The in-memory fake (tests/fake_gcs.py) stands behind fsspec only; orbax writes checkpoint arrays
with TensorStore's own GCS HTTP driver. Here both talk to `gcp-storage-emulator` (a pure-Python GCS
JSON API server) on 127.0.0.1: gcsfs through `STORAGE_EMULATOR_HOST`, TensorStore through
`TENSORSTORE_GCS_HTTP_URL` (+ a fixed test token). The packages are not in the test extra: the test
skips without them (`pip install gcsfs gcp-storage-emulator` to run it).
"""

import socket

import pytest

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

from pathlib import Path  # noqa: E402

from etils import epath  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402

from entrl import config as C  # noqa: E402
from entrl import rundir as R  # noqa: E402
from entrl.checkpoint import CheckpointManager  # noqa: E402
from entrl.metrics import read_metrics  # noqa: E402
from entrl.rl.setup import export_run, train_from_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "rollout.n=4",
        "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.minibatch_prompts=2",
        "train.microbatch_per_shard=1", "data.arithmetic_train_size=64", "curriculum.enabled=false", "reward.workers=1",
        "loss.kl_coef=0.001", "optim.lr=1e-3", "train.tensorboard=true", "mesh.data=4", "mesh.tensor=2",
        "loss.name=entropy_bonus", "train.only_mixed_groups=false", "train.steps=2", "train.checkpoint_every=1"]


@pytest.fixture
def gcs(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test")
    monkeypatch.setattr(R, "SETTLE_S", 0.05)
    gcsfs.GCSFileSystem.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield "gs://bucket"
    finally:
        server.stop()
        gcsfs.GCSFileSystem.clear_instance_cache()
        epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_a_run_on_a_bucket_resumes_like_a_local_run_and_exports(gcs, tmp_path):
    run = f"{gcs}/runs/sent"
    local = tmp_path / "local"
    train_from_config(C.load_config(DEMO, [*TINY, f"train.out_dir={local}"]))
    cfg = C.load_config(DEMO, [*TINY, f"train.out_dir={run}"])
    first = train_from_config(cfg, max_steps=1)
    assert first.step == 1
    resumed = train_from_config(cfg)  # resumes from the step-1 checkpoint in the bucket
    assert [h["step"] for h in resumed.history] == [2]
    mgr = CheckpointManager(f"{run}/checkpoints", read_only=True)
    assert mgr.all_steps() == [1, 2]
    mgr.close()
    got, want = read_metrics(run), read_metrics(local)
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, want):
        for key in ("reward", "entropy", "loss", "grad_norm", "response_length"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(f"{run}/tb").iterdir())
    assert epath.Path(f"{run}/entrl.lock").exists() is False  # released at the end
    # The policy in the bucket is the local run's (same params), and `entrl export` reads the bucket.
    policy = epath.Path(f"{run}/policy/model.safetensors").read_bytes()
    assert policy == (local / "policy" / "model.safetensors").read_bytes()
    export_run(run, str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == policy
