"""Run directories: one path type for local disks and buckets, one run per directory, the run's own files.

A run directory (`train.out_dir`) holds
  entrl_run.json          the resolved RunConfig the run started with (never `config.json`: that name is a model's)
  entrl_resumes.jsonl     one line per resume of the run: when, where, and the settings it changed
  entrl.lock              the lock of the run writing here (holder host, pid, start time)
  metrics.jsonl, tb/      metrics (`entrl.metrics`)
  rollouts.jsonl          sample completions every `train.log_samples_every` steps (`entrl.metrics`)
  checkpoints/<step>/     orbax checkpoints (`entrl.checkpoint`)
  semantic_entropy.jsonl  SE annotation progress when `entrl train` annotates
  policy/                 the final HF policy, written only when the run finished (staged, then renamed)
  wandb_run_id            when W&B is on

Design decisions:
- One path type: `etils.epath.Path` (what orbax uses), through `as_path`. Local paths stay
  plain local paths; `gs://` goes through fsspec (gcsfs) for files and TensorStore's own GCS
  driver for checkpoint arrays. Any other `scheme://` is refused with one line instead of
  becoming a local directory named `s3x:`. `s3://` is accepted (epath and TensorStore know it)
  but untested. A run directory is probed (a small object written, read back and deleted)
  before anything else, so an unreachable bucket or missing credentials fail at start.
- One run per directory. On a local or NFS disk the lock is `fcntl.flock` on `entrl.lock`: the
  kernel releases it when the process dies, however it dies, so there is never a stale lock.
  The file is never deleted (a waiter could hold the old inode). Buckets have no flock: the
  lock is an object with host, pid, time and a random token; the holder rewrites it every
  `HEARTBEAT_S`, a lock not refreshed for `STALE_S` (or held by a dead pid on this host) is
  taken over with a warning, and the taker re-reads the object after `SETTLE_S` so that of two
  runs starting together only the last writer proceeds. Limits: two starts within
  the same fraction of a second can still race (no compare-and-swap through fsspec), and a
  killed run's bucket lock blocks a restart for up to `STALE_S`.
- Several JAX processes of one run: process 0 checks the directory and takes the lock; its
  verdict is broadcast, so the others neither take the lock nor start when process 0 refused.
- A directory is accepted as `train.out_dir` when it is new or empty, or is an entrl run
  (it holds `entrl_run.json`, or a `config.json` of a RunConfig written by entrl before
  `entrl_run.json` existed, or only names of `RUN_FILES`, e.g. SE progress copied in).
  A model directory (config.json + safetensors), an empty path and any other non-empty
  directory are refused. Starting fresh (`resume=False`) in a used run refuses unless
  `overwrite`, which deletes everything in it but the lock: old checkpoints never sit beside
  new ones.
- The run's record (`entrl_run.json`) is the config it started with. Resuming a run that has
  checkpoints compares the resuming config with it: a setting that defines the training trajectory
  must be the same (ConfigError naming each that differs; `entrl.config.RESUME_MAY_CHANGE` lists
  what may change: train.steps, logging, checkpoints, evaluation, the mesh, ...), the record is kept
  and, once a checkpoint is restored, the changes are appended to `entrl_resumes.jsonl`.
- A start that fails before the run wrote anything but its record leaves no directory behind
  (`RunDir.discard`): the record is removed, and the directories the start created with it.
- Shared text files are appended through `append_text`, which opens the file by name for each
  write (never a long-lived handle onto a file that may have been replaced), and rewritten in
  place (`truncate_lines`), so the inode never changes. Bucket objects cannot be appended to:
  there the whole object is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from etils import epath

from entrl.config import ConfigError, resume_changes

log = logging.getLogger("entrl.rundir")

RUN_CONFIG = "entrl_run.json"
RESUMES = "entrl_resumes.jsonl"
LOCK_NAME = "entrl.lock"
LEGACY_RUN_CONFIG = "config.json"  # what entrl wrote before entrl_run.json; read, never written
REMOTE_SCHEMES = ("gs", "s3")  # what orbax/TensorStore and epath both handle
READ_SCHEMES = ("gs", "s3", "az", "hf")  # what epath can read (data files)
# Names a run writes at its top level: a directory holding only these is a run's (e.g. seeded SE progress).
RUN_FILES = frozenset({RUN_CONFIG, RESUMES, LOCK_NAME, "metrics.jsonl", "rollouts.jsonl", "tb", "checkpoints",
                       "semantic_entropy.jsonl", "policy", "wandb_run_id", "plots", "reference", "warmstart",
                       "result.json"})
HEARTBEAT_S = 60.0
STALE_S = 300.0
SETTLE_S = 1.0
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

Path = epath.Path


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def scheme_of(path: Any) -> str | None:
    """`gs` for 'gs://b/x', None for a local path."""
    m = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def is_remote(path: Any) -> bool:
    return scheme_of(path) is not None


def as_path(path: Any, what: str = "path", *, schemes: tuple[str, ...] = REMOTE_SCHEMES) -> epath.Path:
    """`path` as an `epath.Path`; ConfigError for an empty path or a filesystem entrl does not support."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if not text.strip():
        raise ConfigError(f"{what} is empty: give a directory or a gs:// path")
    scheme = scheme_of(text)
    if scheme is not None and scheme not in schemes:
        raise ConfigError(f"{what}={text!r}: unsupported filesystem {scheme}:// (entrl reads and writes local "
                          f"paths and {', '.join(s + '://' for s in schemes)})")
    return epath.Path(text)


def native(path: Any) -> Any:
    """A `pathlib.Path` for a local path (what callers had before), the epath for a remote one."""
    return path if is_remote(path) else pathlib.Path(os.fspath(path))


def absolute(path: epath.Path) -> epath.Path:
    return path if is_remote(path) else epath.Path(os.path.abspath(path))


def inside(path: Any, directory: Any) -> bool:
    """Whether `path` is `directory` or below it (local paths resolved, remote ones compared as text)."""
    if is_remote(path) or is_remote(directory):
        a, b = os.fspath(path).rstrip("/"), os.fspath(directory).rstrip("/")
    else:
        a, b = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(directory))
    return a == b or a.startswith(b.rstrip("/") + "/")


def probe(directory: epath.Path, what: str) -> None:
    """Create `directory` and write, read back and delete a small object in it; ConfigError if any fails."""
    marker = directory / f".entrl-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok")
        if marker.read_text() != "ok":
            raise OSError("read back different bytes")
        marker.unlink()
    except Exception as e:  # noqa: BLE001 - fsspec backends raise anything (ImportError, auth, HTTP, OSError)
        raise ConfigError(f"{what}={str(directory)!r} is not writable: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}"
    if isinstance(e, ImportError) and "gcsfs" in str(e).lower():
        msg += " (gs:// needs `pip install gcsfs`)"
    return msg[:300]


def append_text(path: epath.Path, text: str, *, fsync: bool = False) -> None:
    """Append `text` to the file at `path`, opened by name for this write (remote: rewrite the object)."""
    if is_remote(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_text_whole(path: epath.Path, text: str) -> None:
    """Replace the file at `path` with `text`, whole or not at all: a reader (another process, a rerun after a
    kill) sees the old or the new file, never half of one. Local: a sibling renamed over it; remote: object
    stores replace whole objects anyway."""
    if is_remote(path):
        path.write_text(text)
        return
    staged = pathlib.Path(os.fspath(path) + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, os.fspath(path))


def truncate_lines(path: epath.Path, keep: Callable[[str], bool]) -> int:
    """Keep only the lines of `path` for which `keep(line)` holds, rewriting the same file in place.

    In place (seek, write, truncate) rather than write-and-rename: whoever appends to the file by
    name or with O_APPEND keeps writing into the file readers see. Returns the lines dropped.
    """
    if not path.exists():
        return 0
    if is_remote(path):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if keep(line)]
        if len(kept) != len(lines):
            path.write_text("".join(kept))
        return len(lines) - len(kept)
    with open(path, "r+b") as f:
        lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if keep(line.decode("utf-8", "replace"))]
        if len(kept) == len(lines):
            return 0
        data = b"".join(kept)
        if data and not data.endswith(b"\n"):
            data += b"\n"
        f.seek(0)
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return len(lines) - len(kept)


@contextlib.contextmanager
def local_copy_for_upload(dest: epath.Path) -> Iterator[epath.Path]:
    """A local directory to write into; for a remote `dest`, uploaded file by file on exit, `config.json`
    (what makes a directory a model) last."""
    if not is_remote(dest):
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="entrl-upload-") as tmp:
        yield epath.Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for f in _config_json_last(pathlib.Path(tmp)):
            epath.Path(f).copy(dest / f.relative_to(tmp).as_posix(), overwrite=True)


@contextlib.contextmanager
def staged_dir(dest: epath.Path) -> Iterator[epath.Path]:
    """A local directory to write all of `dest`'s files into; `dest` shows them only once they are complete.

    Local: a hidden sibling renamed to `dest` on success (an earlier `dest` replaced whole; the sibling
    removed on failure), so a process killed while writing (a SIGKILL at the end of a preemption's grace
    period) never leaves a `dest` that looks finished. Where a sibling cannot replace `dest` (a mount point,
    a parent this process may not write), the files are staged inside `dest` and moved in with
    `config.json` (what makes a directory a model) last. Remote: uploaded file by file, `config.json`
    last. A stale staging directory of a killed writer is removed first.
    """
    if is_remote(dest):
        with local_copy_for_upload(dest) as local:
            yield local
        return
    dest = pathlib.Path(os.path.realpath(os.fspath(dest)))  # a symlink: its target is what gets replaced
    dest.parent.mkdir(parents=True, exist_ok=True)
    beside = not os.path.ismount(dest) and os.access(dest.parent, os.W_OK)
    home = dest.parent if beside else dest
    prefix = f".{dest.name}.partial-" if beside else ".partial-"
    if not beside:
        dest.mkdir(exist_ok=True)
    for stale in home.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = home / f"{prefix}{os.getpid()}"
    tmp.mkdir()
    try:
        yield epath.Path(tmp)
        if beside:
            old = home / f"{prefix}{os.getpid()}-old"
            if dest.exists():
                os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                if old.exists():  # put the earlier dest back
                    os.rename(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            for entry in dest.iterdir():  # an earlier dest, replaced whole
                if entry != tmp:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            for f in _config_json_last(tmp):
                target = dest / f.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _config_json_last(root: pathlib.Path) -> list[pathlib.Path]:
    files = [pathlib.Path(d, name) for d, _, names in os.walk(root) for name in names]
    return sorted(files, key=lambda f: (f.name == "config.json", str(f)))


# ---------------------------------------------------------------------------
# What a directory is
# ---------------------------------------------------------------------------


def read_run_config(directory: Any) -> dict | None:
    """The RunConfig dict stored in an entrl run directory, or None when it is not one."""
    d = directory if isinstance(directory, epath.Path) else epath.Path(os.fspath(directory))
    try:
        if (d / RUN_CONFIG).exists():
            return json.loads((d / RUN_CONFIG).read_text())
        legacy = d / LEGACY_RUN_CONFIG
        if legacy.exists() and not _has_weights(d):
            data = json.loads(legacy.read_text())
            if isinstance(data, dict) and {"model", "train", "loss"} <= data.keys():
                return data
    except (OSError, ValueError):
        return None
    return None


def is_run_dir(directory: Any) -> bool:
    return read_run_config(directory) is not None


def _has_weights(d: epath.Path) -> bool:
    try:
        return any(p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"
                   for p in d.iterdir())
    except OSError:
        return False


def is_model_dir(directory: Any) -> bool:
    d = directory if isinstance(directory, epath.Path) else epath.Path(os.fspath(directory))
    return (d / "config.json").exists() and _has_weights(d)


def _entries(d: epath.Path) -> list[epath.Path]:
    try:
        return [p for p in d.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".entrl-probe-")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def used_run_summary(d: epath.Path) -> str | None:
    """'checkpoints up to step 7', 'a finished policy/', 'metrics.jsonl' when the run directory holds results.

    A run config and SE annotation progress alone are not results: a fresh start keeps them.
    """
    steps = checkpoint_steps(d)
    if steps:
        return f"checkpoints up to step {steps[-1]}"
    if (d / "policy").exists():
        return "a finished policy/"
    if (d / "metrics.jsonl").exists():
        return "metrics.jsonl"
    return None


def checkpoint_steps(d: epath.Path) -> list[int]:
    """The steps of the checkpoints in run directory `d`, ascending."""
    ckpt = d / "checkpoints"
    return sorted(int(p.name) for p in _entries(ckpt) if p.name.isdigit()) if ckpt.exists() else []


def check_out_dir(out_dir: Any, *, resume: bool, overwrite: bool,
                  adopt: bool = False) -> tuple[epath.Path, str | None]:
    """(run directory, what to clear first or None); ConfigError when it must not be used. Writes nothing.

    `adopt` accepts a non-empty directory without a run config (a library caller that already wrote
    into it, e.g. `setup()`'s SE annotation).
    """
    d = absolute(as_path(out_dir, "train.out_dir"))
    if not d.exists():
        return d, None
    if not d.is_dir():
        raise ConfigError(f"train.out_dir={str(d)!r} is a file, not a directory")
    if is_model_dir(d):
        raise ConfigError(f"train.out_dir={str(d)!r} is a model directory (config.json + safetensors); "
                          "give the run its own directory")
    if not _entries(d):
        return d, None
    if not is_run_dir(d) and not adopt and not {p.name for p in _entries(d)} <= RUN_FILES:
        raise ConfigError(f"train.out_dir={str(d)!r} is a non-empty directory that is not an entrl run "
                          f"(no {RUN_CONFIG}); give an empty or new directory")
    used = used_run_summary(d)
    if resume or used is None:
        return d, None
    if not overwrite:
        raise ConfigError(f"train.out_dir={str(d)!r} already holds a run ({used}); resume it (drop --no-resume) "
                          "or add --overwrite to delete it and start over")
    return d, used


def clear_run_dir(d: epath.Path) -> None:
    """Delete everything in `d` except the lock (held by this process)."""
    for p in _entries(d):
        if p.is_dir():
            p.rmtree()
        else:
            p.unlink()


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------


def _holder_record(token: str = "") -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "time": time.time(), "token": token}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {holder.get('since', '?')})"


class RunLock:
    """Exclusive lock on a run directory (see the module docstring for local vs bucket semantics)."""

    def __init__(self, directory: epath.Path):
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        if is_remote(self.directory):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _refuse(self, holder: dict | None, extra: str = "") -> None:
        raise ConfigError(f"train.out_dir={str(self.directory)!r} is in use by another entrl run: "
                          f"{_describe(holder)}{extra}; wait for it to finish or use another train.out_dir")

    def _acquire_local(self) -> None:
        import fcntl  # noqa: PLC0415 (POSIX only)

        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = None
            with contextlib.suppress(OSError, ValueError):
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            os.close(fd)
            self._refuse(holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        self._fd = fd

    def _read_remote(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _acquire_remote(self) -> None:
        holder = self._read_remote()
        if holder is not None:
            age = time.time() - float(holder.get("time", 0) or 0)
            dead_here = holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))
            if age < STALE_S and not dead_here:
                self._refuse(holder, f", lock object {self.path} refreshed {age:.0f} s ago (taken over after "
                                     f"{STALE_S:.0f} s without a refresh)")
            log.warning("taking over the stale lock of %s (%s)", _describe(holder), self.path)
        token = secrets.token_hex(8)
        self.path.write_text(json.dumps(_holder_record(token)))
        time.sleep(SETTLE_S)
        now = self._read_remote()
        if not now or now.get("token") != token:
            self._refuse(now)
        self._token = token
        self._thread = threading.Thread(target=self._heartbeat, name="entrl-lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed refresh only ages the lock; never kill the run
                self.path.write_text(json.dumps(_holder_record(self._token or "")))

    def release(self) -> None:
        if self._fd is not None:
            import fcntl  # noqa: PLC0415 (POSIX only)

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._token is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            with contextlib.suppress(Exception):
                if (self._read_remote() or {}).get("token") == self._token:
                    self.path.unlink()
            self._token = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._token is not None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------
# Opening a run directory
# ---------------------------------------------------------------------------


def record_config(d: epath.Path, config: dict, *, resuming: bool) -> tuple[bool, dict | None]:
    """Write `config` as the run's record (`entrl_run.json`); returns (written, the resume's note or None).

    `resuming` a run that has checkpoints keeps the record of the config it started with instead: a setting
    that must not change on resume (`entrl.config.resume_changes`) raises ConfigError naming each one that
    differs; the others that changed make the note, which `RunDir.note_resumed` appends to
    `entrl_resumes.jsonl` once a checkpoint is restored (a resume that fails before that leaves no line).
    """
    stored = read_run_config(d) if resuming and checkpoint_steps(d) else None
    if stored is None:
        (d / RUN_CONFIG).write_text(json.dumps(config, indent=2))
        return True, None
    try:
        changed, conflicts = resume_changes(stored, config)
    except ConfigError as e:  # e.g. a record of an older entrl whose keys no longer read: nothing to compare with
        log.warning("resuming %s: the config is not compared with the run's record %s (%s)", d, RUN_CONFIG, e)
        changed, conflicts = {}, []
    if conflicts:
        raise ConfigError(f"resuming {str(d)!r} needs the settings it started with: {'; '.join(conflicts)} (start a "
                          "new run with another train.out_dir, or add --overwrite to delete this one and start over)")
    return False, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
                   "changed": {k: list(v) for k, v in changed.items()}}


def _missing_dirs(path: epath.Path) -> list[pathlib.Path]:
    """`path` and its ancestors that do not exist yet, deepest first (none for a bucket path)."""
    if is_remote(path):
        return []
    out, p = [], pathlib.Path(os.fspath(path))
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


class RunDir:
    """A locked run directory (process 0 holds the lock; the other processes of the run share it)."""

    def __init__(self, path: epath.Path, lock: RunLock | None, *, wrote_record: bool = False,
                 created: list[pathlib.Path] | None = None, resume_note: dict | None = None):
        self.path = path
        self.lock = lock
        self._wrote_record = wrote_record  # this open wrote entrl_run.json (a start, not a resume)
        self._created = created or []  # directories this open created, deepest first
        self._resume_note = resume_note  # process 0 resuming a run: its line of entrl_resumes.jsonl, when restored

    @classmethod
    def open(cls, out_dir: Any, *, resume: bool = True, overwrite: bool = False,
             config: dict | None = None, adopt: bool = False) -> RunDir:
        """Check, probe and lock `out_dir`, clear it when asked, write `entrl_run.json` (when `config`; resuming a
        run that has checkpoints, compare with it instead: `record_config`).

        `adopt`: see `check_out_dir`.

        Raises ConfigError (on every process of a multi-process run) when the directory must not be used.
        """
        import jax  # noqa: PLC0415 (multi-process only; `entrl plot` reads run directories without JAX)

        primary = jax.process_index() == 0
        path, lock, error, wrote, created, note = None, None, "", False, [], None
        if primary:
            try:
                fresh = not resume or overwrite
                path, _ = check_out_dir(out_dir, resume=True, overwrite=False, adopt=adopt)  # before writing
                created = _missing_dirs(path)
                probe(path, "train.out_dir")
                lock = RunLock(path).acquire()  # a busy directory is refused as busy, whatever else is wrong
                _, clear = check_out_dir(path, resume=not fresh, overwrite=overwrite, adopt=adopt)
                if clear is not None:
                    log.warning("--overwrite: deleting the run in %s (%s)", path, clear)
                    clear_run_dir(path)
                if config is not None:
                    wrote, note = record_config(path, config, resuming=not fresh)
            except Exception as e:  # noqa: BLE001 - any filesystem failure (auth, network, missing gcsfs)
                if path is not None:  # releases the lock; removes what the probe or the lock created
                    cls(path, lock, created=created).discard()
                error = str(e) if isinstance(e, ConfigError) else \
                    f"train.out_dir={str(out_dir)!r} cannot be used: {_one_line(e)}"
        error = _broadcast_text(error)
        if error:
            raise ConfigError(error if primary else f"(from process 0) {error}")
        if path is None:
            path = absolute(as_path(out_dir, "train.out_dir"))
        return cls(path, lock, wrote_record=wrote, created=created, resume_note=note)

    def note_resumed(self, step: int) -> None:
        """The run resumed from the checkpoint of `step`: its line of `entrl_resumes.jsonl` (when, where, the
        settings that changed), written once, by process 0 (a no-op elsewhere and when not resuming)."""
        if self._resume_note is not None:
            append_text(self.path / RESUMES, json.dumps({**self._resume_note, "after_step": step}) + "\n")
            self._resume_note = None

    def discard(self) -> None:
        """Close; and when the run wrote nothing here but the record this open wrote, remove that record and the
        directories this open created: a start that failed leaves no run behind (anything else keeps it all)."""
        try:
            empty = not [p for p in _entries(self.path) if not (p.name == RUN_CONFIG and self._wrote_record)]
        except Exception:  # noqa: BLE001 - a directory that cannot be listed (auth, network) is left as it is
            empty = False
        if empty and self._wrote_record:
            with contextlib.suppress(Exception):
                (self.path / RUN_CONFIG).unlink(missing_ok=True)
        if empty and self._created and self.lock is not None and not is_remote(self.path):
            with contextlib.suppress(OSError):  # no waiter can hold its inode: locks are taken without waiting
                os.unlink(os.fspath(self.path / LOCK_NAME))
        self.close()
        for d in self._created if empty else []:
            with contextlib.suppress(OSError):  # only while empty: a run that started here meanwhile keeps it
                d.rmdir()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _broadcast_text(text: str, size: int = 4096) -> str:
    """Process 0's `text` on every process (a collective when there are several)."""
    import jax  # noqa: PLC0415 (multi-process only; `entrl plot` reads run directories without JAX)

    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process only; `entrl plot` reads run directories without JAX)

    raw = text.encode()[:size]
    buf = np.zeros(size + 4, np.uint8)
    buf[:4] = np.frombuffer(np.int32(len(raw)).tobytes(), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int(np.frombuffer(got[:4].tobytes(), np.int32)[0])
    return bytes(got[4:4 + n]).decode(errors="replace")
