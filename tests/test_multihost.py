"""A pod rehearsal: every stage of a run across 2 JAX processes x 4 CPU devices (`launch/local.py`).

One tiny run exercises what a TPU pod slice does: parameters sharded across both processes
(`mesh.data=1 mesh.fsdp=8`), bfloat16 compute over float32 masters, remat, the semantic-entropy
annotation inside `entrl train`, rewards verified per host, periodic evaluation, checkpoints, a
SIGKILL of both processes after a checkpoint and a rerun that resumes and finishes, the HF policy
(loaded in transformers), `entrl export` and `entrl eval --config` under the launcher. The resumed
run's metrics equal a straight run's exactly.

Across process layouts the same computation sums in another order (gloo's all-reduce across hosts vs
XLA's in one process): in float32 the metrics of 2 processes x 4 devices (`mesh.data=2 mesh.fsdp=4`)
equal one process x 8 devices to round-off, step for step; in bfloat16 that round-off is sometimes one
bfloat16 ulp of a logit, enough to flip a sampled token after a few steps, so the bfloat16 rehearsal
is compared with a straight run of the same layout.

All processes share the persistent compile cache, so a rerun loads the programs the first run built.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CPU_TEST_XLA_FLAGS

from entrl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
RUN = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "model.dtype=bfloat16",
       "model.remat=full", "rollout.n=4", "rollout.max_new_tokens=12", "train.prompts_per_step=8",
       "train.minibatch_prompts=4", "train.microbatch_per_shard=1", "data.arithmetic_train_size=32",
       "data.arithmetic_heldout_size=8", "curriculum.enabled=true", "curriculum.annotate=true",
       "curriculum.samples=4", "curriculum.epochs_per_stage=2", "curriculum.refresh=true", "reward.workers=1",
       "loss.name=entropy_bonus",
       "loss.kl_coef=0.001", "optim.lr=1e-3", "train.only_mixed_groups=false", "train.steps=6",
       "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.eval_every=3", "train.tensorboard=false"]
FSDP8 = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]
F32 = ["model.dtype=float32", "model.remat=none"]
CLI = [sys.executable, "-m", "entrl.cli"]


def _launcher():
    spec = importlib.util.spec_from_file_location("entrl_launch_local", REPO / "launch" / "local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = CPU_TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


def _logs(path: Path) -> dict:
    """Each process's log: its fatal/error lines of XLA and gloo (a stack trace hides them) and its tail."""
    out = {}
    for p in sorted(path.glob("*.log")):
        text = p.read_text()
        fatal = [x for x in text.splitlines() if re.match(r"[FE]\d{4} |.*(Check failed|Terminating|ERROR|Error)", x)]
        out[p.name] = "\n".join(fatal[:20]) + "\n...\n" + text[-3000:]
    return out


def _launch(args, log_dir, timeout=420) -> int:
    return _launcher().launch([*CLI, *args], 2, devices_per_process=4, log_dir=str(log_dir), timeout=timeout,
                              env=_env())


# Not compared: timings, and the largest |sampler - recomputed| log-prob gap, a max over bfloat16 round-off
# whose value depends on the reduction order of the process layout (1e-3 either way).
_SKIP = ("time", "step", "tokens_per_s", "sampler_logprob_gap")


def _same_metrics(a: Path, b: Path, tol: float):
    ra, rb = read_metrics(a), read_metrics(b)
    # step 0: the initial policy's evaluation (val.before_training), logged once by a fresh run
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(0, 7))
    for x, y in zip(ra, rb):
        keys = {k for k in x if not k.startswith("time/") and k not in _SKIP}
        assert keys == {k for k in y if not k.startswith("time/") and k not in _SKIP}
        for k in keys:
            assert abs(x[k] - y[k]) <= tol, f"step {x['step']} {k}: {x[k]} vs {y[k]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference of the rehearsal: the same 2-process run, straight through."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code = _launch(["train", DEMO, *RUN, *FSDP8, f"train.out_dir={out}"], out.parent / "logs")
    assert code == 0, _logs(out.parent / "logs")
    return out


def test_pod_rehearsal_kill_resume_policy_export_eval(straight, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    t0 = time.perf_counter()
    procs = _launcher().start([*CLI, "train", DEMO, *RUN, *FSDP8, f"train.out_dir={run}"], 2, devices_per_process=4,
                              log_dir=str(logs), env=_env())
    deadline = time.time() + 420
    while not (run / "checkpoints" / "2" / "commit_success.txt").exists():
        assert all(p.poll() is None for p, _ in procs), _logs(logs)  # still running, not finished
        assert time.time() < deadline, _logs(logs)
        time.sleep(0.1)
    for p, out in procs:  # preempted without notice: both hosts die at once
        p.send_signal(signal.SIGKILL)
        p.wait()
        out.close()
    assert not (run / "policy").exists()
    killed_at = max(r["step"] for r in read_metrics(run))
    assert 2 <= killed_at < 6
    assert "process 1 of 2" in (logs / "process_1.log").read_text()
    # a provenance header and 32 rows, written once, by process 0
    assert len((run / "semantic_entropy.jsonl").read_text().splitlines()) == 1 + 32

    assert _launch(["train", DEMO, *RUN, *FSDP8, f"train.out_dir={run}"], tmp_path / "logs2") == 0, \
        _logs(tmp_path / "logs2")
    assert "resumed from step" in (tmp_path / "logs2" / "process_0.log").read_text()
    _same_metrics(straight, run, tol=1e-6)
    assert (run / "policy" / "model.safetensors").read_bytes() == (straight / "policy" / "model.safetensors").read_bytes()
    by_step = {r["step"]: r for r in read_metrics(run)}
    assert "eval/pass@1" in by_step[0] and "eval/pass@1" in by_step[3]  # evaluation ran across both processes
    rehearsal_s = time.perf_counter() - t0

    # The end-of-run policy: an HF checkpoint transformers loads, with the trained weights' logits.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from entrl.models import load_pretrained
    from entrl.tokenizer import CharTokenizer

    tok = CharTokenizer.load(run / "policy")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "policy", dtype=torch.float32).eval()
    ids = np.asarray([tok.encode("12+7*3="), tok.encode("4*5-16=")], np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(load_pretrained(run / "policy")(ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    # `entrl export` and `entrl eval --config` under the same launcher.
    assert _launch(["export", str(run), "--out", str(tmp_path / "hf")], tmp_path / "logs3") == 0, \
        _logs(tmp_path / "logs3")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (run / "policy" / "model.safetensors").read_bytes()
    bench = tmp_path / "arith.jsonl"
    bench.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+{i + 1}", "answer": str(2 * i + 1)}) + "\n"
                             for i in range(8)))
    evaluated = ["eval", "--config", DEMO, *RUN, *FSDP8, f"model.path={run}", f"eval.benchmarks=[{bench}]",
                 "eval.n=2", "eval.k=[1, 2]", "eval.max_new_tokens=12", "eval.batch_problems=4",
                 "data.prompt_suffix=", "--out", str(tmp_path / "eval")]
    assert _launch(evaluated, tmp_path / "logs4") == 0, _logs(tmp_path / "logs4")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["benchmarks"]["arith"]["problems"] == 8 and res["settings"]["dtype"] == "bfloat16"
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 16  # one file, written once
    print(f"pod rehearsal (2 processes killed after a checkpoint, resumed, finished) {rehearsal_s:.0f} s")


def test_two_processes_equal_one_process(tmp_path):
    """float32, 2 processes x 4 devices with `mesh.data=2 mesh.fsdp=4` = 1 process x 8 devices with
    `mesh.data=1 mesh.fsdp=8`: the same run (annotation, rewards, updates, evaluation) step for step. The
    loss selects per micro-batch scope, so the rows are dealt to the shards by length across processes."""
    scoped = ["loss.name=sent", "loss.scope=microbatch", "loss.scope_seqs=2"]
    one = tmp_path / "one"
    proc = subprocess.run([*CLI, "train", DEMO, *RUN, *F32, *FSDP8, *scoped, f"train.out_dir={one}"], env=_env(8),
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "two"
    code = _launch(["train", DEMO, *RUN, *F32, *scoped, "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1",
                    f"train.out_dir={two}"], tmp_path / "logs")
    assert code == 0, _logs(tmp_path / "logs")
    _same_metrics(one, two, tol=1e-4)
    assert (two / "policy" / "model.safetensors").exists()
