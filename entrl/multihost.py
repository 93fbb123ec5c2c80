"""Host-side collectives: moving batches and small results between the processes of one JAX cluster.

Every function here is a collective when there are several processes: all
processes call it, in the same order, with the same shapes. With one process
each is a plain conversion, so the single-host path runs the same code.

Design decisions:
- Device arrays that span processes are never fetched whole by accident:
  `local_rows` reads only this process's rows of a row-sharded array (what its
  own devices hold), so each host decodes and verifies its own responses, and
  `gather` is the explicit, all-host fetch.
- Small host results (per-row rewards, answers, per-prompt statistics) travel
  as JSON through `gather_json` (two `process_allgather`s: lengths, then padded
  bytes), so any JSON-able record crosses without a fixed-shape schema.
- Row-sharded arrays are split over the mesh's ("data", "fsdp") axes; a row
  block may be replicated over "tensor" (several devices, one process), and is
  read once.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from entrl.sharding import batch_sharding


def gather(x):
    """The full value of a (possibly multi-host sharded) array on every host (numpy when fetched)."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if x.sharding.is_fully_replicated:  # e.g. an update's scalar metrics: every host holds it all
        return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)


def allgather_local(x) -> np.ndarray:
    """Every process's local rows of a host array, concatenated in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def to_device(x, mesh):
    """A host array that every process holds in full, as one global array split over the batch axes.

    `jnp.asarray` would make a process-local array, which cannot meet global arrays in one jitted
    call when there are several processes.
    """
    if mesh is None:
        return jnp.asarray(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def local_rows(x) -> tuple[np.ndarray, np.ndarray]:
    """(global row indices, values) of this process's rows of an array split over its leading axis.

    The rows this process's devices hold, each read once (a block replicated over the tensor axis
    lives on several local devices), in ascending row order. Without several processes: all rows.
    """
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        x = np.asarray(x)
        return np.arange(x.shape[0]), x
    blocks = {}
    for shard in x.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        start, stop, _ = rows.indices(x.shape[0])
        if (start, stop) not in blocks:
            blocks[(start, stop)] = np.asarray(shard.data)
    keys = sorted(blocks)
    idx = np.concatenate([np.arange(a, b) for a, b in keys])
    return idx, np.concatenate([blocks[k] for k in keys])


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everyone[i, :n])) for i, n in enumerate(lengths)]


def gather_rows(rows: np.ndarray, values: dict[str, list], total: int) -> dict[str, list]:
    """Per-row host results of every process assembled in global row order.

    `rows` are this process's global row indices (`local_rows`), `values` lists aligned with them;
    returns each list with `total` entries, every row filled by the process that owns it.
    """
    parts = gather_json({"rows": [int(r) for r in rows], **values})
    out: dict[str, list] = {k: [None] * total for k in values}
    seen: set[int] = set()
    for part in parts:  # a row held by several processes (batch axes not split across them) counts once
        for i, r in enumerate(part["rows"]):
            if r not in seen:
                seen.add(r)
                for k in values:
                    out[k][r] = part[k][i]
    if len(seen) != total:
        raise RuntimeError(f"gather_rows: the processes hold {len(seen)} rows, expected {total}")
    return out
