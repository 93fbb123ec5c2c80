"""Run directories (`entrl.rundir`): the lock, what may be a train.out_dir, --no-resume/--overwrite,
in-place metric truncation, bare preset names; on a local disk and on an in-memory fake of gs://.

The CLI cases fail before any model is built, so they cost no compile (checked with JAX's compile events).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from etils import epath

from entrl import cli
from entrl import config as C
from entrl import rundir as R
from entrl.metrics import MetricsLogger, read_metrics

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "rollout.n=4",
        "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.minibatch_prompts=2",
        "train.microbatch_per_shard=1", "curriculum.enabled=false", "reward.workers=1", "mesh.data=4", "mesh.tensor=2",
        "train.tensorboard=false"]

_COMPILES = []
_WATCH = [False]


def _on_event(event, duration, **kw):
    if _WATCH[0] and "compil" in event:
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _train(capsys, *args):
    """`entrl train` in-process: (exit code, stderr); asserts nothing was compiled."""
    _COMPILES.clear()
    _WATCH[0] = True
    try:
        code = cli.main(["train", DEMO, *TINY, *args])
    finally:
        _WATCH[0] = False
    err = capsys.readouterr().err.strip()
    assert not _COMPILES, f"compiled before failing: {err}"
    return code, err


def _used_run(d: Path) -> Path:
    """A run directory as a finished-or-interrupted run leaves it."""
    (d / "checkpoints" / "3").mkdir(parents=True)
    (d / "checkpoints" / "3" / "commit_success.txt").write_text("x")
    (d / R.RUN_CONFIG).write_text(json.dumps(C.to_dict(C.load_config(DEMO))))
    (d / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    return d


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------


def test_second_holder_is_refused_with_host_and_pid(tmp_path):
    first = R.RunDir.open(tmp_path / "run", config={"x": 1})
    with pytest.raises(C.ConfigError) as err:
        R.RunDir.open(tmp_path / "run")
    msg = str(err.value)
    assert "in use by another entrl run" in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    first.close()
    R.RunDir.open(tmp_path / "run").close()  # released: usable again


def test_lock_is_released_when_its_process_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from etils import epath; from entrl.rundir import RunLock; "
         "RunLock(epath.Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(C.ConfigError, match=f"pid {holder.pid} "):
            R.RunDir.open(run)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    R.RunDir.open(run).close()


def test_second_train_on_a_busy_out_dir_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with R.RunDir.open(out, config={"x": 1}):
        code, err = _train(capsys, f"train.out_dir={out}")
    assert code == 2, err
    assert err.startswith("entrl: config error:") and "\n" not in err and f"pid {os.getpid()}" in err, err


def test_only_process_0_takes_the_lock(tmp_path, monkeypatch):
    """A non-zero process of a run never touches the lock (process 0 holds it for the run)."""
    out = tmp_path / "run"
    with R.RunDir.open(out, config={"x": 1}):
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        other = R.RunDir.open(out)  # would be refused if it tried to take the lock
        assert other.lock is None
        other.close()


# ---------------------------------------------------------------------------
# What may be train.out_dir
# ---------------------------------------------------------------------------


def _model_dir(d: Path) -> Path:
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    (d / "model.safetensors").write_bytes(b"weights")
    return d


@pytest.mark.parametrize("case,needle", [
    ("model dir", "is a model directory"),
    ("empty path", "train.out_dir is empty"),
    ("other dir", "not an entrl run"),
    ("a file", "is a file"),
    ("unsupported fs", "unsupported filesystem s3x://"),
])
def test_bad_out_dir_is_refused_before_anything_is_written(tmp_path, capsys, case, needle):
    target = {"model dir": lambda: _model_dir(tmp_path / "model"),
              "empty path": lambda: "",
              "other dir": lambda: tmp_path,
              "a file": lambda: tmp_path / "notes.txt",
              "unsupported fs": lambda: "s3x://bucket/x"}[case]
    (tmp_path / "notes.txt").write_text("mine")
    target = target()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = _train(capsys, f"train.out_dir={target}")
    assert code == 2 and err.startswith("entrl: config error:") and "\n" not in err and needle in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert not Path("s3x:").exists()
    if case == "model dir":
        assert (tmp_path / "model" / "config.json").read_text() == '{"model_type": "qwen2"}'


def test_no_resume_on_a_used_run_refuses_unless_overwrite(tmp_path, capsys):
    run = _used_run(tmp_path / "run")
    code, err = _train(capsys, f"train.out_dir={run}", "--no-resume")
    assert code == 2 and "already holds a run (checkpoints up to step 3)" in err and "--overwrite" in err, err
    assert (run / "checkpoints" / "3").exists()
    # --overwrite clears the directory whole before the new run writes its config.
    with R.RunDir.open(run, resume=False, overwrite=True, config={"new": True}):
        assert sorted(p.name for p in run.iterdir()) == sorted([R.RUN_CONFIG, R.LOCK_NAME])
        assert json.loads((run / R.RUN_CONFIG).read_text()) == {"new": True}


def test_resume_keeps_the_record_and_refuses_a_changed_trajectory(tmp_path, capsys):
    """Resuming a run that has checkpoints: a setting that defines the trajectory must be the one the run started
    with (one line naming each that differs, before anything is built); train.steps and logging may change, the
    record keeps the original config and entrl_resumes.jsonl says what changed."""
    run = _used_run(tmp_path / "run")
    original = (run / R.RUN_CONFIG).read_text()
    code, err = _train(capsys, f"train.out_dir={run}", "loss.name=grpo", "optim.lr=1e-4")
    assert code == 2 and "\n" not in err, err
    assert f"resuming {str(run)!r} needs the settings it started with" in err and "--overwrite" in err, err
    assert "loss.name was 'sent', now 'grpo'" in err and "optim.lr was 3e-05, now 0.0001" in err, err
    assert "model.demo_layers" in err and "train.steps" not in err  # TINY's model differs; steps may
    assert (run / R.RUN_CONFIG).read_text() == original and not (run / R.RESUMES).exists()
    started = C.to_dict(C.load_config(DEMO))
    with R.RunDir.open(run, config=C.to_dict(C.load_config(DEMO, ["train.steps=200", "train.log_every=5"]))) as rd:
        assert not (run / R.RESUMES).exists()  # a resume that fails before its checkpoint is restored leaves no line
        rd.note_resumed(3)
        rd.note_resumed(3)  # once
    assert json.loads((run / R.RUN_CONFIG).read_text()) == started
    (resumed,) = [json.loads(line) for line in (run / R.RESUMES).read_text().splitlines()]
    assert resumed["changed"] == {"train.steps": [100, 200], "train.log_every": [1, 5]} and resumed["after_step"] == 3
    with R.RunDir.open(run, resume=False, overwrite=True, config=C.to_dict(C.load_config(DEMO, ["loss.name=grpo"]))):
        assert json.loads((run / R.RUN_CONFIG).read_text())["loss"]["name"] == "grpo"  # a new run: a new record


def test_a_failed_start_leaves_no_directory_behind(tmp_path):
    new = tmp_path / "runs" / "exp" / "a"
    opened = R.RunDir.open(new, config={"x": 1})
    assert (new / R.RUN_CONFIG).exists()
    opened.discard()
    assert not (tmp_path / "runs").exists()  # the directories this start made, parents included
    kept = tmp_path / "kept"  # a start that wrote something of its own (SE progress) keeps it all
    opened = R.RunDir.open(kept, config={"x": 1})
    (kept / "semantic_entropy.jsonl").write_text("{}\n")
    opened.discard()
    assert sorted(p.name for p in kept.iterdir()) == sorted([R.RUN_CONFIG, R.LOCK_NAME, "semantic_entropy.jsonl"])
    used = _used_run(tmp_path / "used")  # a resumed run is never removed
    before = sorted(p.name for p in used.iterdir())
    R.RunDir.open(used, config=json.loads((used / R.RUN_CONFIG).read_text())).discard()
    assert sorted(p.name for p in used.iterdir()) == sorted([*before, R.LOCK_NAME])  # nor a line: it never resumed
    empty = tmp_path / "empty"  # a directory that was there stays, as it was
    empty.mkdir()
    R.RunDir.open(empty, config={"x": 1}).discard()
    assert empty.is_dir() and [p.name for p in empty.iterdir()] in ([], [R.LOCK_NAME])


def test_run_directories_are_told_from_model_directories(tmp_path):
    legacy = tmp_path / "legacy"  # a run written before entrl_run.json: its config.json is a RunConfig
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(C.to_dict(C.load_config(DEMO))))
    model = _model_dir(tmp_path / "model")
    assert R.is_run_dir(legacy) and not R.is_model_dir(legacy)
    assert R.is_model_dir(model) and not R.is_run_dir(model)
    seeded = tmp_path / "seeded"  # only files a run writes (SE progress copied in): accepted, not "used"
    seeded.mkdir()
    (seeded / "semantic_entropy.jsonl").write_text("")
    assert R.check_out_dir(seeded, resume=False, overwrite=False) == (epath.Path(seeded), None)


def test_hub_ids_with_dots_are_downloaded_and_failures_are_one_line(tmp_path, monkeypatch, capsys):
    """The paper's 1.5B and 7B ids have dots in their names (a "suffix" to pathlib): they are hub ids, not
    missing files. A failed download (offline, no such repo) is one config-error line naming the model."""
    import huggingface_hub

    from entrl.build import resolve_model_dir

    calls = []

    def fake_download(repo_id, allow_patterns, local_files_only=False):
        calls.append(repo_id)
        if repo_id.startswith("missing/"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\n"
                                                                 "and outgoing traffic has been disabled.")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    from entrl.colab import MODELS  # the notebooks' accelerator path

    paper = {C.load_config(p).model.path for p in (REPO / "configs" / "paper").glob("*/sent.yaml")}
    repos = sorted(paper | {m.name for m in MODELS.values()})
    assert "Qwen/Qwen2.5-Math-7B" in repos and len(repos) == 4
    (tmp_path / "model.safetensors").write_bytes(b"")  # the downloaded snapshot holds weights
    for repo in repos:
        assert resolve_model_dir(repo) == tmp_path
    assert calls == repos
    (tmp_path / "weights.safetensors").write_text("")
    for path, needle in [("runs/model.safetensors", "does not exist"), ("a/b/c", "does not exist"),
                         ("./Qwen2.5", "does not exist"), (str(tmp_path / "weights.safetensors"), "is a file")]:
        with pytest.raises(C.ConfigError, match=needle):
            resolve_model_dir(path)
    assert len(calls) == len(repos)  # none of those went to the hub
    out, bench = tmp_path / "ev", tmp_path / "bench.jsonl"
    bench.write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n')  # a local benchmark: only the model is missing
    assert cli.main(["eval", "--model", "missing/Qwen2.5-1.5B", "--benchmarks", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("entrl: config error: model.path='missing/Qwen2.5-1.5B' is not a "
                                                   "local directory and could not be downloaded"), err
    assert "cached snapshot folder and outgoing traffic" in err and "writing under" not in err


# ---------------------------------------------------------------------------
# Shared files
# ---------------------------------------------------------------------------


def test_truncate_keeps_the_file_so_no_write_is_lost(tmp_path):
    """Resume truncation rewrites metrics.jsonl in place: an append handle opened before it still
    writes into the file readers see (with write-and-rename its lines went to an unlinked inode)."""
    with MetricsLogger(tmp_path, primary=True, console=False, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": step})
        path = tmp_path / "metrics.jsonl"
        inode = path.stat().st_ino
        stale = open(path, "a")  # e.g. a second writer's handle
        logger.truncate_after(2)
        assert path.stat().st_ino == inode
        stale.write(json.dumps({"step": 3, "reward": 30}) + "\n")
        stale.close()
        logger.log(4, {"reward": 40})
    assert [(r["step"], r["reward"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 2), (3, 30), (4, 40)]


# ---------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------


def test_only_a_bare_name_may_mean_a_builtin_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    builtin = C.read_yaml(REPO / "configs" / "demo.yaml")
    assert C.read_yaml("demo.yaml") == builtin and C.read_yaml("demo") == builtin
    for missing in ("/home/user/exp/demo.yaml", "exp/demo.yaml", "./demo.yaml", str(tmp_path / "demo.yaml")):
        with pytest.raises(C.ConfigError, match="does not exist"):
            C.read_yaml(missing)


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "exp" / "demo.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"entrl: config error: config file {str(tmp_path / 'exp' / 'demo.yaml')!r} does not exist"


# ---------------------------------------------------------------------------
# gs:// (in-memory fake; see tests/fake_gcs.py)
# ---------------------------------------------------------------------------


def test_bucket_lock_object(fake_gcs, monkeypatch, caplog):
    monkeypatch.setattr(R, "SETTLE_S", 0.01)
    first = R.RunDir.open("gs://bucket/run", config={"x": 1})
    lock = json.loads(epath.Path("gs://bucket/run/entrl.lock").read_text())
    assert lock["host"] == socket.gethostname() and lock["pid"] == os.getpid()
    assert json.loads(epath.Path("gs://bucket/run/entrl_run.json").read_text()) == {"x": 1}
    with pytest.raises(C.ConfigError, match=f"pid {os.getpid()} .*lock object gs://bucket/run/entrl.lock"):
        R.RunDir.open("gs://bucket/run")
    # A holder that stopped refreshing its lock for STALE_S is taken over (with a warning).
    epath.Path("gs://bucket/run/entrl.lock").write_text(json.dumps({**lock, "time": time.time() - R.STALE_S - 1}))
    second = R.RunDir.open("gs://bucket/run")
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    first.close()  # its token is no longer in the object: it leaves the new holder's lock alone
    assert epath.Path("gs://bucket/run/entrl.lock").exists()
    second.close()
    assert not epath.Path("gs://bucket/run/entrl.lock").exists()


def test_bucket_run_dir_refusals(fake_gcs, monkeypatch):
    monkeypatch.setattr(R, "SETTLE_S", 0.01)
    base = epath.Path("gs://bucket/used")
    (base / "checkpoints" / "3").mkdir(parents=True)
    (base / "checkpoints" / "3" / "commit_success.txt").write_text("x")
    (base / R.RUN_CONFIG).write_text("{}")
    with pytest.raises(C.ConfigError, match="already holds a run"):
        R.RunDir.open(str(base), resume=False)
    with R.RunDir.open(str(base), resume=False, overwrite=True, config={"new": 1}):
        assert sorted(p.name for p in base.iterdir()) == sorted([R.RUN_CONFIG, R.LOCK_NAME])
    (epath.Path("gs://bucket/other") / "data.csv").write_text("a,b")
    with pytest.raises(C.ConfigError, match="not an entrl run"):
        R.RunDir.open("gs://bucket/other")


def test_unreachable_bucket_is_one_line_at_start(capsys):
    pytest.importorskip("jax")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed: a gs:// probe would try the network")
    except ImportError:
        pass
    with pytest.raises(C.ConfigError, match="(is not writable|cannot be used): .*gcsfs"):
        R.RunDir.open("gs://no-such-bucket/run")


def test_metrics_and_tensorboard_on_a_bucket(fake_gcs):
    run = "gs://bucket/run"
    with MetricsLogger(run, primary=True, console=False, tensorboard=True) as logger:
        for step in range(1, 5):
            logger.log(step, {"reward": step / 10})
    with MetricsLogger(run, primary=True, console=False, tensorboard=True) as logger:  # resume at step 2
        logger.truncate_after(2)
        logger.log(3, {"reward": 3.0})
    assert [(r["step"], r["reward"]) for r in read_metrics(run)] == [(1, 0.1), (2, 0.2), (3, 3.0)]
    events = [k for k in fake_gcs if k.startswith("gs://bucket/run/tb/events.out.tfevents")]
    assert len(events) == 2 and all(len(fake_gcs[k].getvalue()) > 0 for k in events)


def test_records_from_a_bucket(fake_gcs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from entrl.data.sources import load_records

    rows = [{"id": f"p{i}", "problem": f"{i}+1", "answer": str(i + 1)} for i in range(5)]
    epath.Path("gs://bucket/data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    epath.Path("gs://bucket/pq/train.parquet").write_bytes((tmp_path / "train.parquet").read_bytes())
    for source in ("gs://bucket/data/train.jsonl", "gs://bucket/data", "gs://bucket/pq/train.parquet"):
        got = load_records(source).records
        assert [(r.id, r.problem, r.answer) for r in got] == [(r["id"], r["problem"], r["answer"]) for r in rows]
    with pytest.raises(ValueError, match="file not found"):
        load_records("gs://bucket/data/missing.jsonl")


def test_a_staged_directory_appears_only_complete(tmp_path, fake_gcs, monkeypatch):
    """`policy/` and exports: written into a hidden sibling, renamed over the destination when complete (an
    earlier one replaced whole); a failed or killed writer leaves the destination as it was. On a bucket the
    files are uploaded with config.json (what makes a directory a model) last."""
    dest = tmp_path / "policy"
    with R.staged_dir(dest) as d:
        (Path(d) / "config.json").write_text("{}")
        (Path(d) / "model.safetensors").write_bytes(b"v1")
        assert not dest.exists()  # nothing to see until it is complete
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / ".policy.partial-999999").mkdir()  # a killed writer's leftovers
    with pytest.raises(RuntimeError, match="killed"):
        with R.staged_dir(dest) as d:
            (Path(d) / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert (dest / "model.safetensors").read_bytes() == b"v1"
    with R.staged_dir(dest) as d:
        (Path(d) / "model-00001-of-00001.safetensors").write_bytes(b"v2")
    assert [p.name for p in dest.iterdir()] == ["model-00001-of-00001.safetensors"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]  # no staging directory left behind

    # A mount point (or a parent this process may not write): staged inside, moved in with config.json last
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(dest))
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append(Path(b).name) or real_replace(a, b))
    with R.staged_dir(dest) as d:
        assert Path(d).parent == dest
        (Path(d) / "config.json").write_text("{}")
        (Path(d) / "model.safetensors").write_bytes(b"v3")
    assert moved == ["model.safetensors", "config.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    # a symlinked destination: its target is replaced, the link stays
    link = tmp_path / "link"
    link.symlink_to(dest)
    with R.staged_dir(link) as d:
        (Path(d) / "config.json").write_text("{}")
    assert link.is_symlink() and [p.name for p in link.iterdir()] == ["config.json"]
    monkeypatch.undo()

    with R.staged_dir(R.as_path("gs://bucket/run/policy")) as d:
        for name in ("config.json", "a_tokenizer.json", "model.safetensors"):
            (Path(d) / name).write_text(name)
    uploaded = [k.rsplit("/", 1)[-1] for k in fake_gcs if "/run/policy/" in k]
    assert sorted(uploaded) == ["a_tokenizer.json", "config.json", "model.safetensors"] and uploaded[-1] == "config.json"
