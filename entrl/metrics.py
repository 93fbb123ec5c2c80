"""Run metrics: one logger fanning out to JSONL, TensorBoard, W&B and the console; plots.

Agreed metric names (per RL step unless noted; docs/method.md, "What to log"):
  reward                  mean verifier reward of the step's rollouts
  accuracy                share of rollouts whose answer verified correct
  entropy                 mean token entropy of the rollouts (the policy-entropy curve)
  response_length         mean response length in tokens
  truncation_rate         share of responses cut at the length limit
  abs_logratio_mean       mean |logp - logp_old| over response tokens
  ref_kl                  KL estimate to the reference policy
  clip_frac               share of tokens whose ratio was clipped
  penalized_frac          share of tokens penalised by the SENT / Cov terms
  cov_mean, cov_max       mean / max token covariance(logp, advantage)
  zero_var_group_frac     share of prompt groups whose rewards are all equal
  batch_semantic_entropy  semantic entropy of the batch, from its own rollouts
  stage                   current curriculum stage
  loss, grad_norm, lr     optimisation
  time/rollout, time/reward, time/logprob, time/update, time/step   seconds per phase
  tokens_per_s            generated tokens per second
  skipped_nonfinite       1 when the step's update was skipped for NaN/inf, else 0
  reward/<name>           mean of one reward term (`reward.fn`), unweighted; `reward` is the weighted sum
  reward_failures/<name>  responses whose reward function timed out, raised or returned a non-number (scored 0)
Evaluation metrics use the `eval/` prefix (`eval/pass@1`, `eval/avg@k`, ...; `train.eval_every`, the `val`
section; step 0 is the initial policy).

Design decisions:
- `metrics.jsonl` is the record of truth (one JSON object per `log` call:
  `{"step": .., "time": .., **metrics}`); TensorBoard, W&B and the console
  are views. Non-finite values are written as `null` so the file stays strict
  JSON for jq/pandas. Several calls may share a step (train metrics, then
  eval metrics); `read_metrics` merges them, later keys winning.
- Resume: the trainer calls `truncate_after(checkpoint_step)` before logging,
  which drops the JSONL lines of the steps the resumed run will redo and
  makes TensorBoard purge its events from the next step on, so no step
  appears twice. The file is rewritten in place and every `log` opens it by
  name (`entrl.rundir.append_text`): no write ever goes to a replaced inode.
- Run directories may be `gs://` paths (`entrl.rundir`): the JSONL object is
  rewritten whole per step (objects cannot be appended to), TensorBoard
  writes to a local staging directory whose event files are uploaded after
  each step, and W&B keeps its own files in its default local directory.
- Only the primary process logs (`primary=None` asks `jax.process_index()`).
- W&B is imported lazily and keeps one run id per run directory
  (`wandb_run_id`), so a resumed run continues the same W&B run; enabling it
  without the package installed warns once and carries on. Its run name
  defaults to `default_run_name(run_dir)`: the directory's last two path
  components and a short hash of its full path (`runs/a/sent` and
  `runs/b/sent` differ; the same directory always gets the same name).
- Sample completions (`log_samples`) go to `rollouts.jsonl` (one JSON object
  per sample, appended by name and truncated on resume like `metrics.jsonl`)
  and to TensorBoard as text.
- The console gets one line every `log_every` steps (step/total with a small
  bar, steps/s, ETA, reward, entropy, resp_len, loss) rather than a
  carriage-return bar: it stays readable in redirected logs and CI. The line
  goes through `tqdm.write`, so a progress bar (`entrl.progress`) on a
  terminal stays below it instead of being split.
- Plots draw on matplotlib's Agg canvas directly (no `matplotlib.use`), so
  importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import numbers
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from entrl import rundir as R

JSONL_NAME = "metrics.jsonl"
ROLLOUTS_NAME = "rollouts.jsonl"
_TB_ILLEGAL = re.compile(r"[^-/\w.]")  # what TensorBoard's tags may not hold (tensorboardX renames, logging each)


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metric key: `eval/pass@1` -> `eval/pass_1`, `reward/my.py:fmt` -> `reward/my.py_fmt`."""
    return _TB_ILLEGAL.sub("_", key).lstrip("/")


_TB_QUEUE = 10_000  # TensorBoard events in flight (tensorboardX's default, 10, is less than one step's scalars)
_WANDB_ID_FILE = "wandb_run_id"
# (metric key, console label) shown on the progress line when present.
_CONSOLE_KEYS = (("reward", "reward"), ("accuracy", "acc"), ("entropy", "entropy"),
                 ("response_length", "resp_len"), ("loss", "loss"))

log = logging.getLogger(__name__)
_warned_no_wandb = False


class MetricsLogger:
    """Write each step's scalar metrics to every enabled sink."""

    def __init__(self, run_dir: str | Path, *, console: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "entrl", wandb_entity: str = "", run_name: str = "",
                 config: dict | None = None, total_steps: int | None = None, log_every: int = 1,
                 primary: bool | None = None):
        if primary is None:
            import jax  # noqa: PLC0415 (only here: reading and plotting runs, `entrl plot`, need no JAX)
            primary = jax.process_index() == 0
        self.run_dir = R.as_path(run_dir, "run directory")
        self.primary = primary
        self.console = console
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self._tensorboard = tensorboard
        self._config = config
        self._tb = None  # opened on the first log, after any truncate_after
        self._purge_step: int | None = None
        self._wandb = None
        self._start: tuple[float, int] | None = None  # (time, step) of this session's first log
        if not primary:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb:
            self._wandb = _start_wandb(self.run_dir, project=wandb_project, entity=wandb_entity, name=run_name,
                                       config=config)

    @property
    def jsonl_path(self) -> R.Path:
        return self.run_dir / JSONL_NAME

    @property
    def rollouts_path(self) -> R.Path:
        return self.run_dir / ROLLOUTS_NAME

    def truncate_after(self, step: int) -> None:
        """Forget every logged step after `step` (call with the checkpoint step when resuming).

        A fresh run reusing an old directory passes a step below its first one.
        """
        if not self.primary:
            return
        for path in (self.jsonl_path, self.rollouts_path):
            R.truncate_lines(path, lambda line: (_record(line) or {"step": step + 1})["step"] <= step)
        self._purge_step = step + 1
        if self._tb is not None:  # already open: reopen so the purge applies
            self._tb.close()
            self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` for `step` (ints, floats, bools, 0-d arrays; strings go to JSONL only)."""
        if not self.primary:
            return
        step = int(step)
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in values.items()})
        R.append_text(self.jsonl_path, json.dumps(record) + "\n")

        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard:
            self._tensorboard_writer().add_scalars_flat(numeric, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self.console:
            self._print(step, numeric)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append sample completions of `step` to rollouts.jsonl (one `{"step": .., **sample}` per line) and,
        with TensorBoard on, show them as its text for that step. Samples are JSON-able dicts."""
        if not self.primary or not samples:
            return
        step = int(step)
        R.append_text(self.rollouts_path, "".join(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n"
                                                  for s in samples))
        if self._tensorboard:
            self._tensorboard_writer().add_text("rollouts", _samples_markdown(samples), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sinks -------------------------------------------------------------

    def _tensorboard_writer(self) -> _TensorBoard:
        if self._tb is None:
            self._tb = _TensorBoard(self.run_dir / "tb", self._purge_step, self._config)
        return self._tb

    def _print(self, step: int, numeric: dict[str, float]) -> None:
        now = time.time()
        if self._start is None:
            self._start = (now, step)
        evals = {k: v for k, v in numeric.items() if k.startswith("eval/")}
        if evals and len(evals) == len(numeric):
            _say(f"step {step} eval | " + " | ".join(f"{k[5:]} {_short(v)}" for k, v in evals.items()))
            return
        if step % self.log_every and step != self.total_steps:
            return
        parts = [_progress(step, self.total_steps)]
        t0, s0 = self._start
        if step > s0 and now > t0:
            rate = (step - s0) / (now - t0)
            parts.append(f"{rate:.3g} step/s" if rate >= 1 else f"{1 / rate:.3g} s/step")
            if self.total_steps is not None and step < self.total_steps:
                parts.append(f"ETA {_clock((self.total_steps - step) / rate)}")
        parts += [f"{label} {_short(numeric[key])}" for key, label in _CONSOLE_KEYS if key in numeric]
        if numeric.get("skipped_nonfinite"):
            parts.append("SKIPPED (non-finite)")
        _say(" | ".join(parts))


class _TensorBoard:
    """tensorboardX writer that flushes every step (RL steps are seconds apart).

    A remote `logdir` gets a local staging directory whose event files are uploaded after each flush.
    """

    def __init__(self, logdir: R.Path, purge_step: int | None, config: dict | None):
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional: only with train.tensorboard)

        self._remote, self._staging = None, None
        if R.is_remote(logdir):
            self._remote, self._staging = logdir, tempfile.TemporaryDirectory(prefix="entrl-tb-")
            logdir = self._staging.name
        # A session-unique file name: two sessions within one second would otherwise share one (and
        # the second upload would replace the first session's events).
        self._writer = SummaryWriter(logdir=str(logdir), purge_step=purge_step, max_queue=_TB_QUEUE,
                                     filename_suffix="." + secrets.token_hex(4))
        self._error: OSError | None = None
        self._worker = self._watch_writer_thread()
        if config is not None:
            self._writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def _watch_writer_thread(self):
        """tensorboardX writes events in a thread that ends at its first write error (a full disk); once its
        queue is full, adding an event would block forever. Keep that thread's OSError, so `_check` raises it
        in the caller instead (the queue holds far more than one step's events). Returns the thread, or None
        where this tensorboardX is laid out otherwise (then only the size of the queue helps)."""
        events = getattr(getattr(self._writer, "file_writer", None), "event_writer", None)
        records, worker = getattr(events, "_ev_writer", None), getattr(events, "_worker", None)
        if records is None or worker is None:
            return None

        def keeping_errors(method):
            def call(*args):
                try:
                    return method(*args)
                except OSError as e:
                    self._error = self._error or e
                    raise
            return call

        records.write_event, records.flush = keeping_errors(records.write_event), keeping_errors(records.flush)
        self._file = getattr(records, "_file_name", None)
        return worker

    def _check(self) -> None:
        if self._worker is not None and not self._worker.is_alive():
            e = self._error
            raise OSError(e.errno if e else errno.EIO, e.strerror if e else "TensorBoard's event writer stopped",
                          self._file)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._check()
        self._writer.add_text(tag, text, step)
        self._writer.flush()
        self._upload()

    def add_scalars_flat(self, values: dict[str, float], step: int) -> None:
        self._check()
        for key, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(tensorboard_tag(key), value, step)
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._remote is None:
            return
        self._remote.mkdir(parents=True, exist_ok=True)
        for f in Path(self._staging.name).iterdir():
            R.Path(f).copy(self._remote / f.name, overwrite=True)

    def close(self) -> None:
        self._writer.close()
        if self._remote is not None:
            self._upload()
            self._staging.cleanup()


def default_run_name(run_dir: str | Path) -> str:
    """`<parent>/<name>-<hash>`: the run directory's last two path components and 6 hex digits of a hash of its
    absolute path, so `runs/a/sent` and `runs/b/sent` get different names and a resumed run keeps its own."""
    full = str(R.absolute(R.as_path(run_dir, "run directory"))).rstrip("/")
    tail = [p for p in full.split("/") if p][-2:]
    return "/".join(tail) + "-" + hashlib.sha256(full.encode()).hexdigest()[:6]


def _start_wandb(run_dir: R.Path, *, project: str, entity: str, name: str, config: dict | None) -> Any:
    global _warned_no_wandb
    try:
        import wandb  # noqa: PLC0415 (optional extra: only with train.wandb)
    except ImportError:
        if not _warned_no_wandb:
            log.warning("W&B logging is enabled but wandb is not installed (pip install wandb); "
                        "continuing without it")
            _warned_no_wandb = True
        return None
    id_file = run_dir / _WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(**wandb_init_kwargs(run_dir, project=project, entity=entity, name=name, run_id=run_id,
                                          config=config))


def wandb_init_kwargs(run_dir: R.Path, *, project: str, entity: str, name: str, run_id: str,
                      config: dict | None) -> dict[str, Any]:
    """The arguments of `wandb.init` for a run directory: `train.wandb_project` / `wandb_entity` (empty = the
    user's default entity) / `run_name` (empty = `default_run_name`), and the directory's own run id so a
    resumed run continues its W&B run."""
    return {"project": project, "entity": entity or None, "id": run_id, "resume": "allow",
            "name": name or default_run_name(run_dir), "dir": None if R.is_remote(run_dir) else str(run_dir),
            "config": config}


# ---------------------------------------------------------------------------
# Values and formatting
# ---------------------------------------------------------------------------


def _scalar(key: str, value: Any) -> int | float | bool | str:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "size", None) == 1 and hasattr(value, "item"):  # numpy / JAX scalars
        return _scalar(key, value.item())
    raise TypeError(f"metric {key!r} must be a scalar, got {type(value).__name__}")


def _say(line: str) -> None:
    """Print a console line above any progress bar (`tqdm.write`), flushed like `print(..., flush=True)`."""
    tqdm.write(line)
    sys.stdout.flush()


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    """TensorBoard text of sample completions: the scalars on one line, prompt and response as indented
    (code) blocks, which no text inside them can close."""
    blocks = []
    for s in samples:
        head = " · ".join(f"**{k}** `{v}`" for k, v in s.items() if k not in ("prompt", "response"))
        for k in ("prompt", "response"):
            if k in s:
                head += f"\n\n{k}:\n\n" + "\n".join("    " + line for line in str(s[k]).splitlines() or [""])
        blocks.append(head)
    return "\n\n---\n\n".join(blocks)


def _short(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _progress(step: int, total: int | None, width: int = 20) -> str:
    if not total:
        return f"step {step}"
    filled = min(width, int(width * step / total))
    return f"step {step}/{total} [{'#' * filled}{'.' * (width - filled)}]"


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _record(line: str) -> dict | None:
    """The metrics record on `line`, or None when it is not one (blank, torn by a crash, not JSON)."""
    try:
        record = json.loads(line)
        int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None
    return record


def _parse_lines(path: R.Path) -> Iterable[tuple[str, dict]]:
    """(line, record) for every well-formed line; a torn last line (a crash mid-write) or a damaged one (not
    JSON, not UTF-8) is skipped with a warning."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                log.warning("%s:%d is not a metrics record; skipped", path, number)
                continue
            yield line, record


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Records of a run (its directory or its metrics.jsonl), one per step in step order.

    Records sharing a step are merged, later keys winning (train + eval lines of one step).
    """
    path = R.as_path(run_dir, "run directory")
    if path.is_dir():
        path = path / JSONL_NAME
    by_step: dict[int, dict] = {}
    for _, record in _parse_lines(path):
        by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

# (file name, title, y label, metric keys drawn in it; EVAL_KEYS = every eval/pass@k and eval/avg@k logged)
EVAL_KEYS = "eval/*"
_FIGURES = (
    ("entropy.png", "Policy entropy", "mean token entropy (nats)", ("entropy",)),
    ("reward.png", "Reward and accuracy", "value", ("reward", "accuracy", "eval/pass@1")),
    ("response_length.png", "Response length", "tokens", ("response_length",)),
    ("eval.png", "Evaluation during training (val set)", "accuracy", EVAL_KEYS),
)
_LINESTYLES = ("-", "--", ":", "-.")


def _eval_keys(runs: list[list[dict]]) -> tuple[str, ...]:
    """The eval/pass@k and eval/avg@k keys the runs logged: pass@ first, then by k."""
    keys = {k for records in runs for r in records for k in r
            if k.startswith(("eval/pass@", "eval/avg@")) and k.split("@")[1].isdigit()}
    return tuple(sorted(keys, key=lambda k: (not k.startswith("eval/pass@"), int(k.split("@")[1]))))


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, *, labels: list[str] | None = None) -> list[Path]:
    """Draw entropy, reward/accuracy, response-length and evaluation (accuracy vs step) curves of one
    or more runs; return the PNGs.

    One colour per run, one line style per metric; x is the RL step. A figure
    none of whose metrics any run logged is not written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (matplotlib: only plots need it)
    from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib: only plots need it)

    run_dirs = [R.as_path(d, "run directory") for d in run_dirs]
    if labels is None:
        labels = [d.name for d in run_dirs]
        if len(set(labels)) < len(labels):
            labels = [str(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_metrics(d) for d in run_dirs]
    out_dir = R.as_path(out_dir, "plot directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for filename, title, ylabel, keys in _FIGURES:
        if keys == EVAL_KEYS:
            keys = _eval_keys(runs)
        fig = Figure(figsize=(7, 4.2), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = 0
        for run_index, (label, records) in enumerate(zip(labels, runs)):
            color = f"C{run_index % 10}"
            for key, style in zip(keys, _LINESTYLES * (1 + len(keys) // len(_LINESTYLES))):
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                xs, ys = zip(*points)
                name = label if len(keys) == 1 else f"{label}: {key}"
                sparse = key.startswith("eval/")
                ax.plot(xs, ys, style, color=color, label=name, marker="o" if sparse else None,
                        markersize=3, linewidth=1.4)
                drawn += 1
        if not drawn:
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        with path.open("wb") as f:
            fig.savefig(f, format="png")
        written.append(R.native(path))
    return written


def plot_mean_curves(groups: dict[str, list[list[dict]]], key: str, path, *, title: str, ylabel: str):
    """One line per group: the mean over its runs of `key` per step (only steps every run logged),
    with a band from the runs' minimum to their maximum. `groups` maps a label to its runs' records
    (`read_metrics`). Returns the PNG's path, or None when no run logged `key`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (matplotlib: only plots need it)
    from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib: only plots need it)

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for index, (label, runs) in enumerate(groups.items()):
        series = [{r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))} for records in runs]
        steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not steps:
            continue
        ys = np.array([[s[t] for t in steps] for s in series], float)
        color = f"C{index % 10}"
        sparse = key.startswith("eval/")
        ax.plot(steps, ys.mean(0), color=color, label=f"{label} (n={len(runs)})", marker="o" if sparse else None,
                markersize=3, linewidth=1.5)
        if len(runs) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.15, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = R.as_path(path, "plot file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    return R.native(path)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of `rows` restricted to `columns`.

    Floats get 4 significant digits (whole numbers from 10,000 up), missing
    values are blank, and columns holding only numbers are right-aligned.
    """
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), numbers.Number) or row.get(col) is None for row in rows)
               and any(row.get(col) is not None for row in rows) for col in columns]
    widths = [max([len(col), 3] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([_escape(c) for c in columns]), rule] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _escape(str(value))
    if isinstance(value, numbers.Integral):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
