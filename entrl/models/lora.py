"""LoRA: low-rank adapters on the decoder's projections, and the trainable/frozen split of the params.

Each adapted kernel W (q, k, v, o of attention; gate, up, down of the MLP) computes with

    W' = W + s A B,   s = alpha / r,   A [in..., r],  B [r, out...]

(Hu et al. 2021, arXiv 2106.09685): only A and B are trained, W stays frozen.
`in...` / `out...` are the kernel's input and output axes as the decoder keeps
them (q: A [D, r], B [r, H, Dh]; o: A [H, Dh, r], B [r, D]), so the adapters
carry the same logical axis names as their kernel and shard with it.

Design decisions:
- Our own small NNX layer, not qwix (Google's JAX LoRA library, tunix's): qwix
  is not in the environment, and its LoRA provider works by model surgery
  (intercepting a module's matmuls at call time and creating adapter params per
  module path), while this decoder runs its layers as one `lax.scan` over
  stacked [L, ...] params and decodes from re-laid-out `decode_weights()`.
  Here the adapters are `nnx.LoRAParam`s inside the modules they adapt, stacked
  on the same leading "layers" axis, so the scan slices them with the kernels.
- Initialised as PEFT does: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-
  uniform with a = sqrt 5), B = 0, so the adapted model starts exactly at the
  base (x A 0 = 0 exactly). The adapters are the trained (master) weights, in
  their own dtype (`LoRASpec.dtype`, float32 by default as PEFT's
  `autocast_adapter_dtype`); the frozen base may be narrower (the trainer keeps
  it in the compute dtype: it is never updated, and the forward casts it there
  anyway).
- The training forward is unmerged, y = x W + s (x A) B: it never forms a
  full-size weight, nor a full-size weight gradient, and adds r (in + out)
  multiply-adds per token and kernel (1.4% of the 1.5B model's per-token
  weight multiply-adds at r = 16 on all seven projections). Decoding merges instead: `decode_weights()`
  (the sampler's per-call re-laid-out copy of every weight, built anyway) is
  built from W + s A B, which costs r x in x out multiply-adds per kernel once
  per sampling call (21 G for that model: a fifth of one decode step of 64
  rows, ~0.01% of a 2,048-token call), after which each decode step is exactly
  the base model's; applying the adapters unmerged there would add the 1.4% to
  every step.
- The trainable/frozen split is read from the params, not from a flag: a
  params State holding `nnx.LoRAParam`s trains only those (`split`), else all
  of it. The update differentiates and donates only the trainable part; the
  optimizer state and checkpoints hold only it; the frozen base is shared, never
  copied, so the KL reference (the policy at the start: base + B = 0 adapters,
  i.e. the base) costs a copy of the adapters only.
- `merge_adapters` folds the adapters into their kernels and drops them: the
  plain model, which `save_pretrained` writes as an ordinary HF checkpoint.
Left out on purpose: dropout on the adapter input, rsLoRA / DoRA, quantised
bases (QLoRA), adapters on the embedding or lm_head.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entrl.sharding import param_shardings

if TYPE_CHECKING:
    from entrl.models.transformer import Transformer

#: The projections an adapter can target, named like the kernels they adapt (`q_kernel`, `gate_kernel`, ...).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank r, alpha (the update is scaled by alpha / r), the targeted projections (`TARGETS` names) and
    the adapters' storage dtype."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank={self.rank!r}: must be a positive int")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _product(a: jax.Array, b: jax.Array, lead: int) -> jax.Array:
    """A B contracted over the rank, batched over `lead` leading (layer) axes -> [lead..., in..., out...]."""
    prod = lambda x, y: jnp.tensordot(x, y, axes=1)
    for _ in range(lead):
        prod = jax.vmap(prod)
    return prod(a, b)


class Adapter(nnx.Module):
    """The low-rank update s A B of one kernel [lead..., in..., out...] with `n_in` input axes."""

    def __init__(self, kernel_shape: tuple[int, ...], kernel_names: tuple[str, ...], n_in: int, spec: LoRASpec,
                 *, rngs: nnx.Rngs, lead: tuple[int, ...] = ()):
        lead_names = ("layers",) * len(lead)
        in_shape, out_shape = kernel_shape[:n_in], kernel_shape[n_in:]
        in_names, out_names = kernel_names[:n_in], kernel_names[n_in:]
        r, dtype = spec.rank, jnp.dtype(spec.dtype)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), lead + in_shape + (r,), dtype, -bound, bound)
        self.a = nnx.LoRAParam(a, out_sharding=lead_names + in_names + ("lora_rank",), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros(lead + (r,) + out_shape, dtype),
                               out_sharding=lead_names + ("lora_rank",) + out_names, eager_sharding=False)
        self.n_in = n_in
        self.scale = spec.scale

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        """s (x A) B for x [..., in...] -> [..., out...] in `dtype` (one layer's adapter: no lead axes)."""
        xa = jnp.tensordot(x, self.a[...].astype(dtype), axes=self.n_in)
        return jnp.tensordot(xa, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)

    def merged(self, w: jax.Array) -> jax.Array:
        """W + s A B in float32, W shaped like the kernel: the stacked [L, ...] one, or one layer's slice
        (inside the layer scan and `decode_weights`)."""
        a = self.a[...]
        return w.astype(jnp.float32) + self.scale * _product(a, self.b[...], a.ndim - self.n_in - 1)


def adapters_for(targets: tuple[str, ...], kernels: dict[str, tuple[tuple[int, ...], tuple[str, ...], int]],
                 spec: LoRASpec | None, *, rngs: nnx.Rngs, lead: tuple[int, ...]) -> nnx.Dict | None:
    """An `Adapter` per targeted kernel among `kernels` (name -> (shape, names, n_in)), or None when none is."""
    chosen = [t for t in targets if spec is not None and t in spec.targets]
    if not chosen:
        return None
    return nnx.Dict({t: Adapter(*kernels[t], spec, rngs=rngs, lead=lead) for t in chosen})


# ---------------------------------------------------------------------------
# The trainable / frozen split of a params State
# ---------------------------------------------------------------------------


def has_adapters(params) -> bool:
    """Whether the params State (or a tree of the same shape: shardings, abstract values) holds adapters."""
    return bool(jax.tree.leaves(nnx.filter_state(params, nnx.LoRAParam)))


def split(params):
    """(trainable, frozen): the adapters and the rest when `params` holds adapters, else (params, empty)."""
    if not has_adapters(params):
        return params, nnx.State({})
    return nnx.split_state(params, nnx.LoRAParam, ...)


def trainable(params):
    """The part of the params that is trained, optimised and checkpointed (see `split`)."""
    return split(params)[0]


def join(trainable_part, frozen):
    """The params State of `trainable_part` and `frozen` (inverse of `split`)."""
    return nnx.merge_state(trainable_part, frozen)


# ---------------------------------------------------------------------------
# Adding adapters to a model, and merging them back
# ---------------------------------------------------------------------------


def _host_value(path: str, names: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray:  # float32
    """An adapter's initial value drawn with numpy (as `create_model` draws the base): B = 0, A uniform."""
    if path.endswith(".b"):
        return np.zeros(shape, np.float32)
    fan_in = math.prod(s for s, n in zip(shape[:-1], names[:-1]) if n != "layers")
    bound = 1.0 / math.sqrt(fan_in)
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def add_adapters(model: Transformer, spec: LoRASpec, *, seed: int = 0, mesh=None) -> Transformer:
    """`model` with freshly initialised adapters (B = 0: the same function, adapters in `spec.dtype`), its base
    params shared, not copied.

    Values are drawn on the host (see `create_model`); with a mesh each adapter is built straight into
    its sharding (`entrl.sharding.param_shardings`).
    """
    param_dtype = model.embedding.get_value().dtype
    abstract = nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(seed), dtype=model.dtype,
                                                  param_dtype=param_dtype, remat=model.remat, lora=spec))
    graphdef, abstract_state = nnx.split(abstract)
    adapters, _ = nnx.split_state(abstract_state, nnx.LoRAParam, ...)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(adapters, mesh)))
    leaves = []
    for key, var in nnx.to_flat_state(adapters):
        path, shape = ".".join(map(str, key)), tuple(var.shape)
        value = _host_value(path, var.get_metadata()["out_sharding"], shape, seed).astype(var.dtype)
        if mesh is None:
            array = jnp.asarray(value)
        else:
            array = jax.make_array_from_callback(shape, shardings[key].get_value(), lambda idx, v=value: v[idx])
        leaves.append((key, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), nnx.state(model))


def merge_adapters(model: Transformer) -> Transformer:
    """The plain model (no adapters) whose kernels are W + s A B, in the kernels' dtype; `model` unchanged.
    A model without adapters is returned as it is."""
    if model.lora_spec is None:
        return model
    param_dtype = model.embedding.get_value().dtype
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(0), dtype=model.dtype,
                                                               param_dtype=param_dtype, remat=model.remat)))
    merged = {}  # flat path of a kernel -> W + s A B
    for name, module, targets in (("attn", model.layers.attn, ATTN_TARGETS), ("mlp", model.layers.mlp, MLP_TARGETS)):
        for t in targets:
            if module.lora is not None and t in module.lora:
                kernel = getattr(module, f"{t}_kernel").get_value()
                merged[("layers", name, f"{t}_kernel")] = module.lora[t].merged(kernel).astype(kernel.dtype)
    _, base = nnx.split_state(nnx.state(model), nnx.LoRAParam, ...)
    leaves = [(key, var.replace(merged[key]) if key in merged else var) for key, var in nnx.to_flat_state(base)]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
