"""Checkpoints of an RL run: one orbax `CheckpointManager`, five items per step.

A step directory `<directory>/<step>/` holds
  params/      orbax StandardSave: the policy parameters (a pure dict pytree)
  opt_state/   orbax StandardSave: the optax state
  rng/         JSON: the host RNG key (`jax.random.key_data`, its impl, shape)
  meta/        JSON: the caller's metadata (step, curriculum position, config, metrics)
  data_state/  JSON: {"process_count": n, "states": [iterator state of process 0, ...]}
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
- The RNG key and the data-iterator state are JSON, not arrays: they are tiny,
  identical on every device, and JSON stays readable and mesh-independent.
  The iterator state differs per process (each reads its own shard), so `save`
  gathers every process's dict and the primary writes the list; a restore
  needs the same process count unless all states are equal.
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
- A target whose shapes or tree differ from the checkpoint is a configuration
  error, not corruption: it raises at once and moves nothing.
- `read_only=True` (what `entrl export` and `model.path=<run dir>` use) never
  creates, cleans, renames or saves anything: unusable steps are skipped with
  the same warning and left where they are.
- The directory is an `etils.epath` path (`entrl.rundir.as_path`): local, or
  `gs://` (orbax writes the arrays with TensorStore's GCS driver).
- When to save is the trainer's decision (`train.checkpoint_every`), so the
  orbax interval is 1; `force` is passed through.
- Left out: best-k retention by metric, and the grain-native iterator handler
  (the pipeline hands us a JSON state dict instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from entrl import rundir as R

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

COMMIT_MARKER = "commit_success.txt"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `CheckpointManager.restore_latest` hands back to the trainer."""

    step: int
    params: Any  # same tree type as params_target, arrays on its shardings
    opt_state: Any  # same tree type as opt_state_target; None when no target was given
    rng: jax.Array  # the key passed to save (typed keys come back typed)
    meta: dict
    data_state: dict  # this process's iterator state


class CheckpointManager:
    """Save and restore (params, opt_state, rng, meta, data_state) per RL step."""

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
        )
        # Handlers named up front: a fresh manager (a resumed run) must read metadata before any save.
        handlers = {name: ocp.StandardCheckpointHandler() for name in ("params", "opt_state")}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in ("rng", "meta", "data_state")})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def save(self, step: int, *, params: Any, opt_state: Any, rng: jax.Array, meta: dict,
             data_state: dict, force: bool = False) -> bool:
        """Start saving `step` (asynchronously unless async_save=False); True if a save started.

        Returns False when orbax skips the step (already saved, or not after the
        latest saved step). Raises ValueError, before writing anything, when a
        floating leaf of params or opt_state is NaN/inf or meta/data_state is
        not JSON.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if int(step) in self._manager.all_steps():
            log.info("checkpoint step %d already saved; skipping", step)
            return False
        params, opt_state = _to_pure(params), _to_pure(opt_state)
        bad = nonfinite_leaves({"params": params, "opt_state": opt_state})
        if bad:
            shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            raise ValueError(f"refusing to checkpoint step {step}: non-finite values in {shown}")
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.JsonSave(_rng_to_json(rng)),
            meta=ocp.args.JsonSave(_as_json(meta, "meta")),
            data_state=ocp.args.JsonSave({
                "process_count": jax.process_count(),
                "states": _gather_json(_as_json(data_state, "data_state")),
            }),
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()

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
        """(None, restored items) or (why this step is unusable, None)."""
        if not self._committed(step):
            return f"no {COMMIT_MARKER}: the save never finished", None
        targets = {"params": _to_pure(params_target)}
        if opt_state_target is not None:
            targets["opt_state"] = _to_pure(opt_state_target)
        try:
            metadata = self._manager.item_metadata(step)
            if any(metadata[name] is None for name in targets):
                raise FileNotFoundError("no array metadata")
            stored = {name: _shapes_by_path(metadata[name]) for name in targets}
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/json raise many types
            return f"unreadable metadata: {type(e).__name__}: {e}", None
        for name, target in targets.items():
            _check_same_layout(name, step, stored[name], _shapes_by_path(target))
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        args.update({name: ocp.args.JsonRestore() for name in ("rng", "meta", "data_state")})
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - see above
            return f"{type(e).__name__}: {e}", None
        bad = nonfinite_leaves({name: out[name] for name in targets})
        if bad:
            return f"non-finite values in {', '.join(bad[:3])}", None
        return None, out

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
            rng=_rng_from_json(out["rng"]),
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
                    log.warning("moved unusable checkpoint %s aside to %s", src, dst.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("entrl_checkpoint_quarantine")
        self._manager.reload()


# ---------------------------------------------------------------------------
# A single parameter tree (the reference policy of a restarted curriculum stage)
# ---------------------------------------------------------------------------


def save_tree(directory: str | Path, tree: Any) -> None:
    """Write one array tree to `directory` (replacing what is there) and wait until it is on disk.

    Every process calls it (orbax writes each shard from where it lives). Non-finite values are refused.
    """
    tree = _to_pure(tree)
    bad = nonfinite_leaves(tree)
    if bad:
        raise ValueError(f"refusing to save {directory}: non-finite values in {', '.join(bad[:5])}")
    path = R.absolute(R.as_path(directory, "directory"))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)
        ckptr.wait_until_finished()


def restore_tree(directory: str | Path, target: Any) -> Any:
    """The tree `save_tree` wrote to `directory`, on the shardings of the abstract `target`."""
    path = R.absolute(R.as_path(directory, "directory"))
    pure = _to_pure(target)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        stored = _shapes_by_path(getattr(meta, "item_metadata", meta))  # newer orbax wraps it in a StepMetadata
        _check_same_layout(f"reference {path}", 0, stored, _shapes_by_path(pure))
        out = ckptr.restore(path, pure)
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
    groups: dict[Any, list[int]] = {}
    for i, (_, x) in enumerate(named):
        committed = isinstance(x, jax.Array) and x.committed
        key = frozenset(d.id for d in x.sharding.device_set) if committed else None
        groups.setdefault(key, []).append(i)
    bad = set()
    for indices in groups.values():
        flags = _finite_flags([named[i][1] for i in indices])
        # The result is replicated; read the local copy so this also works when it spans processes.
        flags = np.asarray(flags.addressable_data(0))
        bad.update(i for i, ok in zip(indices, flags) if not ok)
    return [named[i][0] for i in sorted(bad)]


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
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata wraps the tree
    return {_path_names(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


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


def _gather_json(obj: Any) -> list[Any]:
    """Every process's `obj`, in process order (a collective when there are several)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everyone[i, :n])) for i, n in enumerate(lengths)]


def _agree(problem: str | None) -> str | None:
    """Across processes a step is good only if it restored everywhere."""
    if jax.process_count() == 1:
        return problem
    failed = np.asarray(multihost_utils.process_allgather(np.array(problem is not None)))
    if problem is None and failed.any():
        return "failed to restore on another process"
    return problem


def _rng_to_json(rng: jax.Array) -> dict:
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(rng) if typed else rng
    if isinstance(data, jax.Array) and not data.is_fully_addressable:
        if not data.sharding.is_fully_replicated:
            raise ValueError("the checkpointed rng key must be replicated across processes")
        data = data.addressable_data(0)
    data = np.asarray(data)
    return {"impl": str(jax.random.key_impl(rng)) if typed else None,
            "dtype": str(data.dtype), "shape": list(data.shape), "data": data.ravel().tolist()}


def _rng_from_json(stored: dict) -> jax.Array:
    data = jnp.asarray(np.asarray(stored["data"], dtype=stored["dtype"]).reshape(stored["shape"]))
    return data if stored["impl"] is None else jax.random.wrap_key_data(data, impl=stored["impl"])
