"""Meshes, the logical-axis table, and helpers that place params and batches.

Design decisions:
- Three mesh axes: `data` (pure data parallelism, params replicated), `fsdp`
  (batch split AND params sharded along their `embed` dimension, gathered per
  layer by the compiler) and `tensor` (heads, MLP columns, vocabulary). Axis
  types are Auto: the compiler propagates shardings from the params and the
  batch, so model code never annotates an op with mesh axes.
- Model code names logical axes only (`("embed", "q_heads", "head_dim")`);
  `LOGICAL_RULES` is the single table from logical names to mesh axes.
- A mesh axis that does not divide a dimension is dropped for that array
  (replicated instead): e.g. 2 KV heads on a tensor axis of 4. This keeps
  any model loadable on any mesh; the cost is memory, not correctness.
- Batches are split over ("data", "fsdp") on their leading dimension and built
  from each process's local rows (`make_array_from_process_local_data`), so the
  same code runs on one CPU and on a multi-host TPU pod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # examples of a batch
    ("layers", None),  # the stacked decoder layers' leading axis (scanned over, never sharded)
    ("vocab", "tensor"),  # embedding rows / logit columns
    ("embed", "fsdp"),  # model width of params (FSDP shards here)
    ("q_heads", "tensor"),  # query heads
    ("kv_heads", "tensor"),  # key/value heads
    ("head_dim", None),  # per-head width
    ("mlp", "tensor"),  # MLP hidden width
    ("norm", None),  # RMSNorm scales
    ("lora_rank", None),  # the rank axis of LoRA adapters (small: replicated)
    ("seq", None),  # sequence positions of activations
    ("cache_seq", None),  # KV-cache slots
    ("act_embed", None),  # model width of activations (batch already uses fsdp)
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; one size may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh {name}={size}: must be a positive size or -1 (fill)")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: only one of data/fsdp/tensor may be -1, got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n % known:
            raise ValueError(
                f"mesh: {n} devices are not divisible by the fixed axes {sizes} (product {known}); "
                "choose sizes whose product divides the device count"
            )
        sizes[fill[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
            f"{math.prod(sizes.values())} but there are {n} devices; make the product equal {n} or set one axis to -1"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def data_shards(mesh) -> int:
    """How many slices the batch is split into: data * fsdp (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> PartitionSpec:
    """PartitionSpec of logical axis names via `LOGICAL_RULES`.

    With `shape` and `mesh` (a Mesh or AbstractMesh), mesh axes that do not
    divide their dimension, or that an earlier dimension already uses, are
    dropped (that dimension is then replicated over them).
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    sizes = _axis_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise ValueError(f"unknown logical axis {name!r}; add it to entrl.sharding.LOGICAL_RULES")
        axes = _RULES[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if sizes is not None:
            kept, prod = [], 1
            for a in axes:
                if a in sizes and a not in used and shape is not None and shape[i] % (prod * sizes[a]) == 0:
                    kept.append(a)
                    prod *= sizes[a]
            axes = tuple(kept)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(state, mesh: Mesh):
    """NamedSharding for every Variable of an nnx.State (abstract or concrete), same tree structure."""

    def one(x):
        if _is_var(x):
            names = x.get_metadata().get("out_sharding")
            spec = logical_to_spec(names, x.shape, mesh) if names else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every param of `model` to its sharding on `mesh` (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over ("data", "fsdp"); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def sampler_prompts(problems: int, n: int, mesh: Mesh, *, slots: int = 0) -> tuple[int, NamedSharding]:
    """(prompts, their sharding) of a sampler call on `problems` prompts with `n` samples each: the fewest
    prompts >= problems whose rows (prompts x n) split over the data shards (the caller pads with
    copies), split over the shards themselves when they divide, else replicated (the sampler splits
    the rows it makes from them). Rows that did not split would be decoded whole by every device.
    With `slots` (continuous batching) each shard refills its slots from its own prompts: the prompts
    themselves split."""
    shards = data_shards(mesh)
    step = shards if slots else shards // math.gcd(shards, n)
    prompts = -(-problems // step) * step
    return prompts, batch_sharding(mesh, 2) if prompts % shards == 0 else NamedSharding(mesh, PartitionSpec())


def shard_batch(batch, mesh: Mesh):
    """Global arrays from this process's rows of a batch (a pytree of host arrays).

    Each process passes its local rows; the global batch is their
    concatenation in process order. The global batch size must be divisible by
    data * fsdp.
    """
    split = _axis_sizes(mesh)["data"] * _axis_sizes(mesh)["fsdp"]

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("shard_batch: every leaf needs a leading batch dimension")
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % split:
            raise ValueError(
                f"shard_batch: global batch of {global_rows} rows is not divisible by data*fsdp={split}; "
                "pad the batch or change the mesh"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, batch)
