"""Checkpoints of an RL run: one orbax `CheckpointManager`, five items per step.

A step directory `<directory>/<step>/` holds
  params/      orbax StandardSave: the policy parameters (a pure dict pytree)
  opt_state/   orbax StandardSave: the optax state
  meta/        JSON: the caller's metadata (step, curriculum position, config, metrics)
  data_state/  JSON: {"process_count": n, "states": [iterator state of process 0, ...]}
  integrity/   JSON: a fingerprint of every array leaf and a SHA-256 of each JSON item
  commit_success.txt   written by orbax as the last act of a finished save

Design decisions:
- Every process calls `save` and `restore_latest` (orbax's multi-controller
  contract). Arrays are written shard by shard from wherever they live, and
  restored straight onto the shardings carried by the abstract targets
  (`jax.ShapeDtypeStruct(..., sharding=...)`), so a run may resume on a
  different mesh without ever materialising an unsharded copy.
- `nnx.State` trees (anywhere in params or opt_state) are stored as pure dicts
  (`nnx.to_pure_dict`), so checkpoints do not depend on NNX's Variable
  classes; when the restore target holds an `nnx.State`, the result is rebuilt
  into one with the target's Variable types.
- The data-iterator state is JSON, not arrays: it is tiny and JSON stays
  readable and mesh-independent. It differs per process (each reads its own
  shard), so `save` gathers every process's dict and the primary writes the
  list; a restore needs the same process count unless all states are equal.
- No RNG key is stored: the trainer derives each step's key from `train.seed`
  and the step number, so a resume needs none. Steps written by an older
  entrl hold an `rng/` item; it is left unread (its handler stays registered
  so orbax can list those steps).
- Non-finite floats never reach a checkpoint: `save` raises `ValueError`
  naming the offending leaves, found with one jitted reduction over all
  floating leaves (compiled once per tree structure and device set).
- A checkpoint counts only once orbax committed it (its `commit_success.txt`
  exists; orbax lists step directories without one on local disks, and never
  temp directories). `restore_latest` walks committed steps newest first; a
  step that is uncommitted, unreadable, or restores to non-finite values is
  logged with a warning and moved aside to `<step>.corrupt-<time>` (renamed,
  not deleted), because orbax refuses to save a step at or below its latest
  one and the resumed run must be able to write those steps again.
- Silent corruption is caught by an end-to-end fingerprint, because nothing
  below us checks the data bytes: orbax 0.12.8 writes zarr2 arrays (zstd, no
  checksum) into OCDBT files (no checksum either; zarr3 would only checksum
  the shard index), and a 4-byte flip inside a data file restored without
  complaint. `save` computes, on device and before anything is written,
  `fingerprint_leaves` of params and opt_state: per leaf, two sums mod 2^32 of
  a bijective 32-bit mix of each 32-bit word of the value's bit pattern XOR a
  mix of its global flat position. Integer sums are exact in any order, so
  the result is the same for any mesh, sharding or process count (a run may
  resume on another mesh); the mix is a bijection, so a change of any single
  word (any single bit flip) always changes both sums, and any other change is
  missed with odds ~2^-64; the position mix makes it order-sensitive. It is one
  jitted pass over the arrays (no extra disk read), computed by every process
  as a collective, so all processes agree on the verdict. File hashes were the
  alternative: they also cover metadata, but depend on the mesh and process
  count that wrote the files, cost a second read of every byte, and corrupt
  metadata that matters already fails to parse or changes shapes or values.
  The fingerprints and a SHA-256 of each JSON item go to `integrity/`, saved
  and committed with the step; `restore_latest` recomputes them and treats a
  mismatch like any unreadable step. A step written before `integrity/`
  existed (its orbax `_CHECKPOINT_METADATA` names no such item) is restored
  unverified, with a warning.
- A leaf is restored in the dtype it was stored in (verified), then cast to
  the target's dtype, so a run resumed with another `model.dtype` is not
  mistaken for corruption.
- Every warning is one line: exception texts are collapsed to one line
  without TensorStore's spec dump, and the "Event loop is closed" noise that
  orbax's tensorstore callbacks raise after a failed read or write is
  swallowed while a manager is open.
- A save that fails in orbax (disk full, read-only, quota) raises
  `CheckpointWriteError`, an `OSError` with a one-line message naming the
  directory and the reason, from `save` or `wait`, whichever sees it first
  (orbax writes in a background thread); `entrl` prints it as one line.
- A target whose shapes or tree differ from the checkpoint is a configuration
  error, not corruption: it raises at once and moves nothing.
- `read_only=True` (what `entrl export` and `model.path=<run dir>` use) never
  creates, cleans, renames or saves anything: unusable steps are skipped with
  the same warning and left where they are.
- The directory is an `etils.epath` path (`entrl.rundir.as_path`): local, or
  `gs://` (orbax writes the arrays with TensorStore's GCS driver).
- When to save is the trainer's decision (`train.checkpoint_every`), so the
  orbax interval is 1; `force` is passed through.
- Replicated arrays are written replica-parallel (each replica writes a
  slice, orbax's default off GPU) only when each slice is at least
  `REPLICA_SLICE_MIN_BYTES`: every slice is an eager device op, compiled once
  per shape and offset, and for small leaves (norms, biases, a test model's
  every leaf) those compiles cost more than the write they split.
- Left out: best-k retention by metric, and the grain-native iterator handler
  (the pipeline hands us a JSON state dict instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata.array_metadata_store import Store as _ArrayMetadataStore  # no public alias

from entrl import rundir as R
from entrl.multihost import gather_json

COMMIT_MARKER = "commit_success.txt"
INTEGRITY_ITEM = "integrity"
_JSON_ITEMS = ("meta", "data_state")
_LEGACY_JSON_ITEMS = ("rng",)  # written by older entrl, never read

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only file system, ...); the message is one line."""


REPLICA_SLICE_MIN_BYTES = 1 << 20


def _standard_handler() -> ocp.StandardCheckpointHandler:
    """orbax's StandardCheckpointHandler (same settings) whose jax.Array handler slices for
    replica-parallel writes only from `REPLICA_SLICE_MIN_BYTES` per slice (see the module docstring).

    The registry is this handler's own, so other orbax users in the process are unaffected. orbax
    offers no constructor argument for it, so the handler's PyTree implementation is replaced (it stays
    a StandardCheckpointHandler: orbax matches StandardSave/StandardRestore to handlers by type).
    """
    array = ocp.type_handlers.ArrayHandler(array_metadata_store=_ArrayMetadataStore(),
                                           min_slice_bytes_for_replica_parallel=REPLICA_SLICE_MIN_BYTES)
    registry = ocp.type_handlers.create_type_handler_registry(
        *((ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()
          if ty is not jax.Array), (jax.Array, array))
    handler = ocp.StandardCheckpointHandler()
    assert isinstance(getattr(handler, "_impl", None), ocp.PyTreeCheckpointHandler), "orbax changed its handler"
    handler._impl = ocp.PyTreeCheckpointHandler(  # what StandardCheckpointHandler() builds, with our registry
        save_concurrent_gb=96, restore_concurrent_gb=96, use_ocdbt=True, type_handler_registry=registry)
    return handler


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `CheckpointManager.restore_latest` hands back to the trainer."""

    step: int
    params: Any  # same tree type as params_target, arrays on its shardings
    opt_state: Any  # same tree type as opt_state_target; None when no target was given
    meta: dict
    data_state: dict  # this process's iterator state


def _read_only_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


class CheckpointManager:
    """Save and restore (params, opt_state, meta, data_state) per RL step."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least one checkpoint")
        self.directory = R.absolute(R.as_path(directory, "checkpoint directory"))
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a crashed save are never checkpoints
            create=not read_only,
            read_only=read_only,
            **({"save_interval_steps": 0} if read_only else {}),  # what read_only sets anyway, with a warning
        )
        # Handlers named up front: a fresh manager (a resumed run) must read metadata before any save.
        handlers = {name: _standard_handler() for name in ("params", "opt_state")}
        handlers.update({name: ocp.JsonCheckpointHandler()
                         for name in (*_JSON_ITEMS, *_LEGACY_JSON_ITEMS, INTEGRITY_ITEM)})
        absl = logging.getLogger("absl")
        absl.addFilter(_read_only_notice)  # orbax warns that the directory it was asked to read is read-only
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            absl.removeFilter(_read_only_notice)
        _ClosedLoopNoiseFilter.install()
        self._closed = False

    # -- listing -----------------------------------------------------------

    def _step_dir(self, step: int) -> R.Path:
        return self.directory / str(step)

    def _committed(self, step: int) -> bool:
        return (self._step_dir(step) / COMMIT_MARKER).is_file()

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending."""
        return sorted(s for s in self._manager.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save --------------------------------------------------------------

    def save(self, step: int, *, params: Any, opt_state: Any, meta: dict, data_state: dict,
             force: bool = False) -> bool:
        """Start saving `step` (asynchronously unless async_save=False); True if a save started.

        Returns False when orbax skips the step (already saved, or not after the
        latest saved step). Raises ValueError, before writing anything, when a
        floating leaf of params or opt_state is NaN/inf or meta/data_state is
        not JSON. The fingerprints of `integrity/` are computed here, from the
        arrays as they are now.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if int(step) in self._manager.all_steps():
            log.info("checkpoint step %d already saved; skipping", step)
            return False
        arrays = {"params": _to_pure(params), "opt_state": _to_pure(opt_state)}
        bad = nonfinite_leaves(arrays)
        if bad:
            shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            raise ValueError(f"refusing to checkpoint step {step}: non-finite values in {shown}")
        docs = {
            "meta": _as_json(meta, "meta"),
            "data_state": {"process_count": jax.process_count(),
                           "states": gather_json(_as_json(data_state, "data_state"))},
        }
        integrity = {"format": 1,
                     "arrays": {name: fingerprint_leaves(tree) for name, tree in arrays.items()},
                     "json": {name: _json_digest(doc) for name, doc in docs.items()}}
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
            **{name: ocp.args.JsonSave(doc) for name, doc in docs.items()},
            **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)},
        )
        with self._writing():
            return bool(self._manager.save(int(step), args=args, force=force))

    def wait(self) -> None:
        """Block until every started save is committed; CheckpointWriteError when one failed."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._manager.close()
            _ClosedLoopNoiseFilter.remove()

    @contextlib.contextmanager
    def _writing(self):
        """Turn whatever orbax/tensorstore raise for a failed write into one CheckpointWriteError."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, tensorstore's ValueError, orbax's wrappers
            _ClosedLoopNoiseFilter.failed = True  # the failed save's writes still in flight report later
            errno = getattr(e, "errno", None)
            if errno is None and (m := _OS_ERROR_CODE.search(str(e))):  # tensorstore: [os_error_code='28']
                errno = int(m.group(1))
            if errno:
                raise CheckpointWriteError(errno, os.strerror(errno), str(self.directory)) from e
            raise CheckpointWriteError(f"cannot write checkpoints to {self.directory}: {one_line_error(e)}") from e

    # -- restore -----------------------------------------------------------

    def restore_latest(self, *, params_target: Any, opt_state_target: Any = None,
                       strict: bool = False, step: int | None = None) -> Restored | None:
        """Restore the newest good checkpoint (or only `step`) onto the targets' shardings.

        Targets are abstract trees (`jax.eval_shape` results or
        `ShapeDtypeStruct`s with `.sharding`; concrete arrays also work).
        Returns None for an empty directory. Bad steps are skipped with a
        warning and moved aside (left in place when read-only); if none
        restores, returns None with a warning, or raises RuntimeError when
        `strict`. A `step` that is not on disk raises ValueError naming the
        kept steps.
        """
        self.wait()
        self._manager.reload()
        candidates = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if int(step) not in candidates:
                kept = ", ".join(map(str, sorted(candidates))) or "none"
                raise ValueError(f"{self.directory} has no checkpoint of step {step} (kept steps: {kept})")
            candidates = [int(step)]
        bad: list[int] = []
        for step in candidates:
            problem, out = self._try_restore(step, params_target, opt_state_target)
            problem = _agree(problem)
            if problem is None:
                self._quarantine(bad)
                return self._finish(step, out, params_target, opt_state_target)
            log.warning("checkpoint step %d in %s cannot be restored (%s); falling back to the "
                        "previous one", step, self.directory, problem)
            bad.append(step)
        self._quarantine(bad)
        if candidates:
            message = f"no checkpoint in {self.directory} could be restored (tried steps {candidates})"
            if strict:
                raise RuntimeError(message)
            log.warning("%s; starting from scratch", message)
        return None

    def _try_restore(self, step: int, params_target: Any, opt_state_target: Any) -> tuple[str | None, Any]:
        """(None, restored items) or (why this step is unusable, None).

        Reading can fail on one process only (a file only it reads), and what follows each read is a
        collective when the arrays span processes (orbax's restore ends in a barrier; the integrity and
        finiteness checks are jitted over the arrays), so the processes agree after each read that every one
        of them made it. Left: a read that fails inside orbax's restore on one process only leaves the
        others in orbax's barrier (orbax offers no restore without it)."""
        targets = {"params": _to_pure(params_target)}
        if opt_state_target is not None:
            targets["opt_state"] = _to_pure(opt_state_target)
        problem, stored, verified = self._read_metadata(step, targets)
        problem = _agree(problem)
        if problem is not None:
            return problem, None
        for name, target in targets.items():  # the same metadata on every process: all raise, or none
            _check_same_layout(name, step, {p: s for p, (s, _) in stored[name].items()}, _shapes_by_path(target))
        # Restore each leaf in its stored dtype, so the fingerprint sees the bytes that were written.
        as_stored = {name: _with_dtypes(target, stored[name]) for name, target in targets.items()}
        args = {name: ocp.args.StandardRestore(target) for name, target in as_stored.items()}
        args.update({name: ocp.args.JsonRestore() for name in (*_JSON_ITEMS, *([INTEGRITY_ITEM] * verified))})
        try:
            out, problem = self._manager.restore(step, args=ocp.args.Composite(**args)), None
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            out, problem = None, one_line_error(e)
        problem = _agree(problem)
        if problem is not None:
            return problem, None
        if verified:
            problem = _integrity_problem(out[INTEGRITY_ITEM], {name: out[name] for name in targets},
                                         {name: out[name] for name in _JSON_ITEMS})
            if problem:
                return problem, None
        else:
            log.warning("checkpoint step %d in %s has no integrity record (written by an older entrl): "
                        "restored without verifying its bytes", step, self.directory)
        bad = nonfinite_leaves({name: out[name] for name in targets})
        if bad:
            return f"non-finite values in {', '.join(bad[:3])}", None
        restored = {name: _cast_like(out[name], target) for name, target in targets.items()}
        return None, {**{k: out[k] for k in _JSON_ITEMS}, **restored}

    def _read_metadata(self, step: int, targets: dict):
        """(problem or None, stored leaves by item, whether the step has an integrity record): this process's
        reading of the step's commit marker and metadata, no collective."""
        if not self._committed(step):
            return f"no {COMMIT_MARKER}: the save never finished", None, False
        try:
            metadata = self._manager.item_metadata(step)
            if any(metadata[name] is None for name in targets):
                raise FileNotFoundError("no array metadata")
            stored = {name: _leaves_by_path(metadata[name]) for name in targets}
            return None, stored, self._has_integrity_record(step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/json raise many types
            return f"unreadable metadata: {one_line_error(e)}", None, False

    def _has_integrity_record(self, step: int) -> bool:
        """Whether the step was saved with `integrity/` (orbax lists every saved item in its metadata).

        A step that lists it but lost the directory is corrupt (raises, caught as unreadable).
        """
        listed = json.loads((self._step_dir(step) / "_CHECKPOINT_METADATA").read_text())
        if INTEGRITY_ITEM not in listed.get("item_handlers", {}):
            return False
        if not (self._step_dir(step) / INTEGRITY_ITEM).is_dir():
            raise FileNotFoundError(f"{INTEGRITY_ITEM}/ is missing")
        return True

    def _finish(self, step: int, out: Any, params_target: Any, opt_state_target: Any) -> Restored:
        stored = out["data_state"]
        states, count = stored["states"], stored["process_count"]
        if count == jax.process_count():
            data_state = states[jax.process_index()]
        elif all(s == states[0] for s in states):
            data_state = states[0]
        else:
            raise ValueError(
                f"checkpoint step {step} holds data-iterator states of {count} processes but this "
                f"run has {jax.process_count()}: resume with {count} processes")
        return Restored(
            step=step,
            params=_from_pure(params_target, out["params"]),
            opt_state=None if opt_state_target is None else _from_pure(opt_state_target, out["opt_state"]),
            meta=out["meta"],
            data_state=data_state,
        )

    def _quarantine(self, steps: list[int]) -> None:
        """Rename bad step directories so orbax forgets them and the run can save those steps anew."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = self._step_dir(step)
                if src.exists():
                    dst, n = src.with_name(f"{src.name}.corrupt-{stamp}"), 1
                    while dst.exists():  # the same step went bad twice within a second
                        dst, n = src.with_name(f"{src.name}.corrupt-{stamp}-{n}"), n + 1
                    src.rename(dst)
                    # INFO: the "cannot be restored ... falling back" warning already said it, in one line
                    log.info("moved unusable checkpoint %s aside to %s", src, dst.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("entrl_checkpoint_quarantine")
        self._manager.reload()


# ---------------------------------------------------------------------------
# A single parameter tree (the reference policy of a restarted curriculum stage)
# ---------------------------------------------------------------------------


class TreeIntegrityError(ValueError):
    """A tree `save_tree` wrote whose values changed on disk since (its fingerprints differ)."""


def _tree_record(path: R.Path) -> R.Path:
    return path.with_name(path.name + ".integrity.json")  # beside orbax's directory, not inside it


def save_tree(directory: str | Path, tree: Any) -> None:
    """Write one array tree to `directory` (replacing what is there) and wait until it is on disk, with
    the fingerprint of every leaf in `<directory>.integrity.json` (checked by `restore_tree`).

    Every process calls it (orbax writes each shard from where it lives; the fingerprints are a collective).
    Non-finite values are refused.
    """
    tree = _to_pure(tree)
    bad = nonfinite_leaves(tree)
    if bad:
        raise ValueError(f"refusing to save {directory}: non-finite values in {', '.join(bad[:5])}")
    path = R.absolute(R.as_path(directory, "directory"))
    record, record_path = fingerprint_leaves(tree), _tree_record(path)
    if jax.process_index() == 0 and record_path.exists():  # an earlier save's: never beside this one's arrays
        record_path.unlink()
    with ocp.AsyncCheckpointer(_standard_handler()) as ckptr:  # StandardCheckpointer with our array handler
        ckptr.save(path, args=ocp.args.StandardSave(tree), force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        R.write_text_whole(record_path, json.dumps(record, sort_keys=True) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("entrl_save_tree")


def restore_tree(directory: str | Path, target: Any) -> Any:
    """The tree `save_tree` wrote to `directory`, on the shardings of the abstract `target`.

    ValueError when it does not fit `target`; `TreeIntegrityError` when a leaf's values changed on disk since
    the save (a tree saved before the fingerprints were written is restored unchecked)."""
    path = R.absolute(R.as_path(directory, "directory"))
    pure = _to_pure(target)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        stored = _shapes_by_path(getattr(meta, "item_metadata", meta))  # newer orbax wraps it in a StepMetadata
        _check_same_layout(f"reference {path}", 0, stored, _shapes_by_path(pure))
        out = ckptr.restore(path, pure)
    record = _tree_record(path)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except ValueError as e:
            raise TreeIntegrityError(f"its integrity record {record.name} is unreadable ({e})") from None
        now = fingerprint_leaves(out)
        changed = sorted(p for p in saved.keys() | now.keys() if saved.get(p) != now.get(p))
        if changed:
            more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
            raise TreeIntegrityError(f"integrity check failed: {', '.join(changed[:3])}{more} changed on disk "
                                     "since the save")
    return _from_pure(target, out)


# ---------------------------------------------------------------------------
# Finite check
# ---------------------------------------------------------------------------


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating leaves of `tree` holding a NaN or inf.

    One jitted reduction per set of devices the leaves are committed to
    (normally one: everything lives on the mesh; jit refuses to mix arrays
    committed to different devices, e.g. a scalar pinned to device 0).
    """
    named = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    bad = set()
    for indices in _by_device_set([x for _, x in named]).values():
        flags = _finite_flags([named[i][1] for i in indices])
        # The result is replicated; read the local copy so this also works when it spans processes.
        flags = np.asarray(flags.addressable_data(0))
        bad.update(i for i, ok in zip(indices, flags) if not ok)
    return [named[i][0] for i in sorted(bad)]


def _by_device_set(leaves: list[Any]) -> dict[Any, list[int]]:
    """Indices of `leaves` grouped by the devices they are committed to (None: uncommitted/host)."""
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        committed = isinstance(x, jax.Array) and x.committed
        key = frozenset(d.id for d in x.sharding.device_set) if committed else None
        groups.setdefault(key, []).append(i)
    return groups


# ---------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------

_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two independent lanes: a 64-bit fingerprint per leaf


def _mix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bit pattern of `x` as uint32 words (8-byte types give a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """[2] uint32: sum over words w_i at global flat position i of mix(w_i ^ mix(i + seed)), mod 2^32."""
    w = _words(x)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= w.shape[axis]
    return jnp.stack([jnp.sum(_mix32(w ^ _mix32(pos + jnp.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS])


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_fingerprint(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def weights_digest(tree: Any) -> str:
    """A short digest of `fingerprint_leaves(tree)`: the same for the same values wherever and however they were
    loaded, different once they change (the provenance of SE annotations and `entrl eval` samples)."""
    doc = json.dumps(fingerprint_leaves(tree), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def fingerprint_leaves(tree: Any) -> dict[str, list]:
    """{leaf path: [dtype, lane0, lane1]} for every array leaf of `tree` (see the module docstring).

    Independent of sharding, mesh and process count; a collective when the
    arrays span processes (every process gets the same answer).
    """
    named = [("/".join(_path_names(path)), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if hasattr(x, "dtype") and hasattr(x, "shape")]
    values: dict[int, np.ndarray] = {}
    for indices in _by_device_set([x for _, x in named]).values():
        fps = np.asarray(_fingerprints([named[i][1] for i in indices]).addressable_data(0))
        values.update(zip(indices, fps))
    return {name: [str(np.dtype(x.dtype)) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else str(x.dtype),
                   int(values[i][0]), int(values[i][1])] for i, (name, x) in enumerate(named)}


def _json_digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _integrity_problem(record: dict, arrays: dict[str, Any], docs: dict[str, Any]) -> str | None:
    """Why the restored items differ from what was saved, or None when every fingerprint matches."""
    mismatched = []
    for name, tree in arrays.items():
        saved, now = record["arrays"][name], fingerprint_leaves(tree)
        mismatched += [f"{name}/{path}" for path in sorted(saved.keys() | now.keys())
                       if saved.get(path) != now.get(path)]
    mismatched += [f"{name} (JSON)" for name, doc in docs.items() if record["json"][name] != _json_digest(doc)]
    if not mismatched:
        return None
    more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    return f"integrity check failed: {', '.join(mismatched[:3])}{more} changed on disk since the save"


# ---------------------------------------------------------------------------
# Tree conversions
# ---------------------------------------------------------------------------


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def _to_pure(tree: Any) -> Any:
    """Replace every nnx.State inside `tree` by its pure dict."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def _from_pure(target: Any, restored: Any) -> Any:
    """Give `restored` (pure) back the tree type of `target`, rebuilding its nnx.States."""
    def rebuild(t: Any, r: Any) -> Any:
        if not _is_state(t):
            return r
        state = jax.tree.map(lambda x: x, t)  # fresh Variables; the target stays untouched
        nnx.replace_by_pure_dict(state, r)
        return state

    return jax.tree.map(rebuild, target, restored, is_leaf=_is_state)


def _path_names(path: tuple) -> tuple[str, ...]:
    """Key path as plain strings: orbax metadata turns namedtuple fields and int keys into dict keys."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def _shapes_by_path(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {p: shape for p, (shape, _) in _leaves_by_path(tree).items()}


def _leaves_by_path(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """{path: (shape, dtype)} of the array leaves of a tree or of orbax's metadata of one."""
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata wraps the tree
    return {_path_names(path): (tuple(leaf.shape), getattr(leaf, "dtype", None))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def _with_dtypes(target: Any, stored: dict) -> Any:
    """`target` with each array leaf whose stored dtype differs replaced by a struct of the stored dtype."""
    def leaf(path, x):
        dtype = stored.get(_path_names(path), (None, None))[1]
        if dtype is None or not hasattr(x, "dtype") or np.dtype(x.dtype) == np.dtype(dtype):
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map_with_path(leaf, target)


def _cast_like(restored: Any, target: Any) -> Any:
    """Cast restored leaves to their target's dtype (a no-op when they already match)."""
    return jax.tree.map(lambda r, t: r.astype(t.dtype) if hasattr(t, "dtype") and r.dtype != t.dtype else r,
                        restored, target)


def _check_same_layout(name: str, step: int, stored: dict, wanted: dict) -> None:
    """Raise ValueError when the target does not describe the stored tree (a config mismatch)."""
    problems = [f"{'/'.join(p)} missing in checkpoint" for p in wanted.keys() - stored.keys()]
    problems += [f"{'/'.join(p)} in checkpoint but not in target" for p in stored.keys() - wanted.keys()]
    problems += [f"{'/'.join(p)} stored {stored[p]} vs target {wanted[p]}"
                 for p in wanted.keys() & stored.keys() if stored[p] != wanted[p]]
    if problems:
        raise ValueError(
            f"checkpoint step {step}: {name} does not match the restore target (different model "
            f"or optimizer config?): " + "; ".join(sorted(problems)[:5]))


# ---------------------------------------------------------------------------
# JSON items
# ---------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (Path, R.Path)):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _as_json(obj: Any, what: str) -> Any:
    """Round-trip through JSON now, so a bad value fails here and not in orbax's background thread."""
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {what} must be JSON: {e}") from None


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
_SPEC_DUMP = re.compile(r"\s*\[tensorstore_spec=.*$", re.DOTALL)


def one_line_error(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line: TensorStore's spec dump dropped, whitespace collapsed, cut at `limit`."""
    text = " ".join(_SPEC_DUMP.sub("", str(e)).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ClosedLoopNoiseFilter:
    """An unraisable hook that drops the 'Event loop is closed' errors of tensorstore callbacks.

    orbax runs each save and restore in its own event loop; when one array
    fails, the reads or writes still in flight complete later and report to the
    closed loop, which Python prints as multi-line "Exception ignored"
    tracebacks (dozens for one full disk). Nothing is lost: the failure itself
    is raised by the restore or save. Installed while any CheckpointManager is
    open (counted), removed when the last one closes, unless a write failed:
    its stragglers report after the close too, up to the interpreter's exit.
    """

    open_managers = 0
    failed = False  # a save failed: keep the filter for the rest of the process

    def __init__(self):
        self.previous = sys.unraisablehook

    def __call__(self, unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        self.previous(unraisable)

    @classmethod
    def install(cls) -> None:
        cls.open_managers += 1
        if not isinstance(sys.unraisablehook, cls):
            sys.unraisablehook = cls()

    @classmethod
    def remove(cls) -> None:
        cls.open_managers = max(cls.open_managers - 1, 0)
        if cls.open_managers == 0 and not cls.failed and isinstance(sys.unraisablehook, cls):
            sys.unraisablehook = sys.unraisablehook.previous


def _agree(problem: str | None) -> str | None:
    """Across processes a step is good only if it restored everywhere."""
    if jax.process_count() == 1:
        return problem
    failed = np.asarray(multihost_utils.process_allgather(np.array(problem is not None)))
    if problem is None and failed.any():
        return "failed to restore on another process"
    return problem
