"""Metrics sinks (JSONL, TensorBoard, console), resume truncation, plots, markdown tables."""

import json
import logging
import struct

import numpy as np
import pytest

import entrl.metrics as metrics_mod
from entrl.metrics import MetricsLogger, markdown_table, plot_runs, read_metrics


def _logger(run_dir, **kw):
    kw.setdefault("console", False)
    kw.setdefault("tensorboard", False)
    return MetricsLogger(run_dir, primary=True, **kw)


def _tb_values(tb_dir):
    """(tag, step, summary value) of every summary in tensorboardX event files (TFRecord framing: no
    tensorboard needed)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                yield value.tag, event.step, value


def _tb_scalars(tb_dir):
    """{(tag, step): value} of the scalar summaries."""
    return {(tag, step): v.simple_value for tag, step, v in _tb_values(tb_dir) if v.HasField("simple_value")}


def test_jsonl_round_trip_and_value_types(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(1, {"reward": np.float32(0.5), "stage": np.int64(2), "loss": float("nan"),
                       "skipped_nonfinite": np.bool_(False), "note": "warmup"})
        logger.log(2, {"reward": 0.75, "entropy": 1.25})
        logger.log(2, {"eval/pass@1": 0.4})  # eval metrics of the same step merge in
        with pytest.raises(TypeError, match="'bad' must be a scalar"):
            logger.log(3, {"bad": np.ones(3)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["loss"] is None  # strict JSON: NaN -> null
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["reward"] == 0.5 and recs[0]["stage"] == 2 and recs[0]["skipped_nonfinite"] is False
    assert recs[0]["note"] == "warmup"
    assert recs[1]["reward"] == 0.75 and recs[1]["eval/pass@1"] == 0.4 and "time" in recs[1]


def test_truncate_on_resume(tmp_path, caplog):
    with _logger(tmp_path) as logger:
        for step in range(1, 7):
            logger.log(step, {"reward": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rew')  # the crash tore the last line
    # Resume from the checkpoint of step 4: steps 5.. are redone and must not appear twice.
    with _logger(tmp_path) as logger, caplog.at_level(logging.WARNING):
        logger.truncate_after(4)
        for step in range(5, 8):
            logger.log(step, {"reward": step})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 8))
    assert [r["reward"] for r in recs] == [0.1, 0.2, 0.3, 0.4, 5, 6, 7]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7


def test_damaged_lines_are_skipped_with_a_warning(tmp_path, caplog):
    """Bytes that are not UTF-8 (a disk or copy error) cost their line, not the whole file (entrl plot)."""
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "reward": 0.5}\n\xff\xfe\n{"step": 2, "reward": 0.7}\n')
    with caplog.at_level(logging.WARNING):
        recs = read_metrics(tmp_path)
    assert [r["reward"] for r in recs] == [0.5, 0.7]
    assert any("metrics.jsonl:2 is not a metrics record" in r.getMessage() for r in caplog.records)


def test_tensorboard_events(tmp_path, caplog):
    config = {"loss": {"name": "sent"}}
    with caplog.at_level(logging.INFO), _logger(tmp_path, tensorboard=True, config=config) as logger:
        logger.log(1, {"reward": 0.25, "time/step": 1.5, "note": "text is skipped", "eval/pass@1": 0.5,
                       "reward/my.py:fmt": 1.0})
        logger.log(2, {"reward": 0.5, "loss": float("inf")})
    scalars = _tb_scalars(tmp_path / "tb")
    assert scalars[("reward", 1)] == 0.25 and scalars[("reward", 2)] == 0.5
    assert scalars[("time/step", 1)] == 1.5
    assert ("loss", 2) not in scalars and not any(tag == "note" for tag, _ in scalars)
    # keys TensorBoard's tags cannot hold, renamed by entrl (tensorboardX would log a line per key and step)
    assert scalars[("eval/pass_1", 1)] == 0.5 and scalars[("reward/my.py_fmt", 1)] == 1.0
    assert "illegal" not in caplog.text


def test_console_line(tmp_path, capsys):
    with _logger(tmp_path, console=True, total_steps=10, log_every=2) as logger:
        logger.log(1, {"reward": 0.5})
        logger.log(2, {"reward": 0.5, "entropy": 0.3, "response_length": 41.0, "loss": 0.01, "lr": 1e-6})
        logger.log(2, {"eval/pass@1": 0.4})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2  # step 1 is not a multiple of log_every
    assert out[0].startswith("step 2/10 [####")
    for part in ("reward 0.5", "entropy 0.3", "resp_len 41", "loss 0.01", "ETA"):
        assert part in out[0]
    assert "lr" not in out[0]
    assert out[1] == "step 2 eval | pass@1 0.4"


def test_secondary_process_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", primary=False, tensorboard=True)
    logger.log(1, {"reward": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_wandb_missing_warns_once(tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kw):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr(metrics_mod, "_warned_no_wandb", False)
    with caplog.at_level(logging.WARNING, logger="entrl.metrics"):
        for _ in range(2):
            with _logger(tmp_path, wandb=True) as logger:
                logger.log(1, {"reward": 1.0})
    assert sum("wandb is not installed" in r.getMessage() for r in caplog.records) == 1


def _tb_texts(tb_dir):
    """{(tag, step): text} of the text summaries."""
    return {(tag, step): v.tensor.string_val[0].decode() for tag, step, v in _tb_values(tb_dir)
            if v.HasField("tensor") and v.tensor.string_val}


def test_rollouts_jsonl_and_tensorboard_text(tmp_path):
    """log_samples appends one row per sample to rollouts.jsonl (step first) and shows them as TensorBoard text;
    a resume drops the rows of the steps it redoes, as for metrics.jsonl."""
    sample = {"id": "p1", "reward": 1.0, "prompt": "1+1=", "response": "2\n```\nnot code"}
    with _logger(tmp_path, tensorboard=True) as logger:
        logger.log_samples(2, [sample, {**sample, "id": "p2", "reward": 0.0}])
        logger.log_samples(4, [{**sample, "id": "p3"}])
        logger.log_samples(5, [])  # nothing to write
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["id"], r["reward"]) for r in rows] == [(2, "p1", 1.0), (2, "p2", 0.0), (4, "p3", 1.0)]
    assert list(rows[0]) == ["step", "id", "reward", "prompt", "response"] and rows[0]["response"] == sample["response"]
    texts = _tb_texts(tmp_path / "tb")
    step2 = next(text for (tag, step), text in texts.items() if tag.startswith("rollouts") and step == 2)
    assert "**id** `p1`" in step2 and "**id** `p2`" in step2 and "    1+1=" in step2  # prompt as a code block
    with _logger(tmp_path) as logger:
        logger.truncate_after(3)
        logger.log_samples(4, [{**sample, "id": "p4"}])
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["id"]) for r in rows] == [(2, "p1"), (2, "p2"), (4, "p4")]


def test_wandb_run_names_do_not_collide(tmp_path, monkeypatch):
    """The default W&B run name tells runs/a/sent from runs/b/sent (the last folder alone did not), is the same for
    the same directory however it is written, and train.run_name / wandb_entity / wandb_project go to wandb.init."""
    from entrl.metrics import default_run_name, wandb_init_kwargs
    from entrl.rundir import as_path

    monkeypatch.chdir(tmp_path)
    a, b = default_run_name("runs/a/sent"), default_run_name("runs/b/sent")
    assert a != b and a.startswith("a/sent-") and b.startswith("b/sent-")
    assert default_run_name(tmp_path / "runs" / "a" / "sent") == a == default_run_name("runs/a/../a/sent/")
    assert default_run_name("gs://bucket/runs/a/sent").startswith("a/sent-")
    run = as_path(str(tmp_path / "runs" / "a" / "sent"), "run")
    kw = wandb_init_kwargs(run, project="p", entity="", name="", run_id="id1", config={"x": 1})
    assert kw == {"project": "p", "entity": None, "id": "id1", "resume": "allow", "name": a, "dir": str(run),
                  "config": {"x": 1}}
    kw = wandb_init_kwargs(run, project="p", entity="team", name="my-run", run_id="id1", config=None)
    assert kw["name"] == "my-run" and kw["entity"] == "team"


def test_plot_two_runs(tmp_path):
    for name, slope in (("grpo", -0.02), ("sent", -0.005)):
        with _logger(tmp_path / name) as logger:
            for step in range(1, 21):
                logger.log(step, {"entropy": 1.0 + slope * step, "reward": 0.3 + 0.01 * step,
                                  "response_length": 40.0 + step})
                if step % 10 == 0:
                    logger.log(step, {"eval/pass@1": 0.2 + 0.01 * step})
    with _logger(tmp_path / "no_len") as logger:  # a run missing keys is drawn where it can be
        logger.log(1, {"entropy": 0.9})

    out = plot_runs([tmp_path / "grpo", tmp_path / "sent", tmp_path / "no_len"], tmp_path / "plots")
    assert sorted(p.name for p in out) == ["entropy.png", "eval.png", "response_length.png", "reward.png"]
    for path in out:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    only_entropy = plot_runs([tmp_path / "no_len"], tmp_path / "plots2", labels=["tiny"])
    assert [p.name for p in only_entropy] == ["entropy.png"]
    with pytest.raises(ValueError, match="labels"):
        plot_runs([tmp_path / "grpo"], tmp_path / "plots3", labels=["a", "b"])


def test_eval_curves_of_every_k(tmp_path, monkeypatch):
    """eval.png draws every eval/pass@k and eval/avg@k a run logged (accuracy vs step, step 0 = before RL),
    pass@ first and by k; plot_mean_curves averages runs over the steps they all logged."""
    from entrl.metrics import _eval_keys, plot_mean_curves

    runs = {}
    for seed in range(2):
        run = tmp_path / f"s{seed}"
        with _logger(run) as logger:
            for step in (0, 5, 10):
                logger.log(step, {"eval/pass@1": 0.3 + 0.01 * step, "eval/pass@16": 0.8 - 0.01 * step - seed / 10,
                                  "eval/avg@16": 0.3, "eval/response_length": 12.0})
                if step:
                    logger.log(step, {"entropy": 0.2 - 0.01 * step})
        runs[seed] = read_metrics(run)
    assert _eval_keys(list(runs.values())) == ("eval/pass@1", "eval/pass@16", "eval/avg@16")
    out = plot_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "plots")
    assert "eval.png" in [p.name for p in out]

    from matplotlib.axes import Axes

    calls = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw)) or original(self, *a, **kw))
    png = plot_mean_curves({"grpo": list(runs.values())}, "eval/pass@16", tmp_path / "mean.png", title="t", ylabel="y")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (xs, ys), kw = calls[-1][0][:2], calls[-1][1]
    assert list(xs) == [0, 5, 10] and np.allclose(ys, [0.75, 0.70, 0.65]) and kw["label"] == "grpo (n=2)"
    assert plot_mean_curves({"grpo": list(runs.values())}, "missing", tmp_path / "none.png", title="t",
                            ylabel="y") is None


def test_markdown_table():
    rows = [
        {"loss": "grpo", "pass@1": 0.41234, "entropy": 0.05, "steps": 100, "wall_s": 12345.6},
        {"loss": "sent|v2", "pass@1": 0.5, "steps": 100, "wall_s": 98.76},
    ]
    table = markdown_table(rows, ["loss", "pass@1", "entropy", "steps", "wall_s"])
    assert table.splitlines() == [
        "| loss     | pass@1 | entropy | steps | wall_s |",
        "|----------|-------:|--------:|------:|-------:|",
        "| grpo     | 0.4123 |    0.05 |   100 |  12346 |",
        "| sent\\|v2 |    0.5 |         |   100 |  98.76 |",
    ]
