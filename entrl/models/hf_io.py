"""Hugging Face checkpoints <-> entrl Transformer, without torch.

Design decisions:
- ONE declarative table, `KEY_MAP`, says how each HF tensor relates to an
  entrl param: (HF name, param path, HF layout). The layout names the HF
  tensor's dimensions in the param's logical axes, `*` joining axes that HF
  flattens into one dimension (row-major). E.g. `q_proj.weight` is
  `"q_heads*head_dim,embed"` ([H*Dh, D]) and the param is
  ("embed", "q_heads", "head_dim"): loading reshapes to [H, Dh, D] and
  transposes by axis name; saving does the inverse. Load and save both read
  the same table, so they cannot disagree.
- Loading builds the model abstractly (`nnx.eval_shape`), computes each
  param's sharding, and fills it with `jax.make_array_from_callback`: every
  device reads only its own slice of the tensor from the memory-mapped
  safetensors file (`safe_open(framework="numpy").get_slice`). Host memory
  stays at one device-slice at a time, so a 14B checkpoint never needs a
  second host copy. The dtype cast happens on that slice.
- Checks before reading: supported architecture (from config.json), every
  needed tensor present, every shape as the config implies; each failure is a
  ValueError naming the tensor. Tensors the model does not use (e.g.
  `lm_head.weight` next to tied embeddings) are skipped with a warning.
- Saving gathers one param at a time to host (all processes take part, process
  0 writes) into size-capped `model-0000k-of-0000n.safetensors` files plus an
  index, config.json and generation_config.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from entrl.models.config import ModelConfig
from entrl.models.transformer import Transformer
from entrl.sharding import param_shardings

_L = "model.layers.{i}."
_P = "layers.{i}."

# (HF tensor name, entrl param path, HF layout in the param's logical axes)
KEY_MAP: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embedding", "vocab,embed"),
    ("lm_head.weight", "lm_head", "vocab,embed"),
    ("model.norm.weight", "final_norm.scale", "norm"),
    (_L + "input_layernorm.weight", _P + "input_norm.scale", "norm"),
    (_L + "post_attention_layernorm.weight", _P + "post_attn_norm.scale", "norm"),
    (_L + "self_attn.q_proj.weight", _P + "attn.q_kernel", "q_heads*head_dim,embed"),
    (_L + "self_attn.k_proj.weight", _P + "attn.k_kernel", "kv_heads*head_dim,embed"),
    (_L + "self_attn.v_proj.weight", _P + "attn.v_kernel", "kv_heads*head_dim,embed"),
    (_L + "self_attn.o_proj.weight", _P + "attn.o_kernel", "embed,q_heads*head_dim"),
    (_L + "self_attn.q_proj.bias", _P + "attn.q_bias", "q_heads*head_dim"),
    (_L + "self_attn.k_proj.bias", _P + "attn.k_bias", "kv_heads*head_dim"),
    (_L + "self_attn.v_proj.bias", _P + "attn.v_bias", "kv_heads*head_dim"),
    (_L + "self_attn.q_norm.weight", _P + "attn.q_norm.scale", "norm"),
    (_L + "self_attn.k_norm.weight", _P + "attn.k_norm.scale", "norm"),
    (_L + "mlp.gate_proj.weight", _P + "mlp.gate_kernel", "mlp,embed"),
    (_L + "mlp.up_proj.weight", _P + "mlp.up_kernel", "mlp,embed"),
    (_L + "mlp.down_proj.weight", _P + "mlp.down_kernel", "embed,mlp"),
)

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


class _Layout:
    """How a param of logical axes `names` and shape `shape` is stored by HF.

    HF = reshape(transpose(param, inverse perm), hf_shape); `inter` is the HF
    tensor with its `*`-joined dimensions split, ordered as in the HF layout.
    """

    def __init__(self, layout: str, names: tuple[str, ...], shape: tuple[int, ...]):
        self.groups = [g.split("*") for g in layout.split(",")]
        inter_names = [n for g in self.groups for n in g]
        if sorted(inter_names) != sorted(names):
            raise AssertionError(f"KEY_MAP layout {layout!r} does not match param axes {names}")
        size = dict(zip(names, shape))
        self.inter_sizes = [size[n] for n in inter_names]
        self.perm = tuple(inter_names.index(n) for n in names)  # param axis i = inter axis perm[i]
        self.hf_shape = tuple(math.prod(size[n] for n in g) for g in self.groups)

    def read(self, tensor_slice, index: tuple[slice, ...], param_shape: tuple[int, ...]) -> np.ndarray:
        """The block param[index], read from the HF tensor without touching the rest."""
        inter_ranges = [None] * len(self.inter_sizes)
        for dim, s in enumerate(index):
            start, stop, _ = s.indices(param_shape[dim])
            inter_ranges[self.perm[dim]] = (start, stop)
        hf_index, block_shape, post_index, j = [], [], [], 0
        for g in self.groups:
            first, rest = j, list(range(j + 1, j + len(g)))
            inner = math.prod(self.inter_sizes[k] for k in rest)
            a, b = inter_ranges[first]
            hf_index.append(slice(a * inner, b * inner))
            block_shape.append(b - a)
            post_index.append(slice(None))
            for k in rest:  # inner axes are read whole, then cut
                block_shape.append(self.inter_sizes[k])
                post_index.append(slice(*inter_ranges[k]))
            j += len(g)
        block = np.asarray(tensor_slice[tuple(hf_index)]).reshape(block_shape)[tuple(post_index)]
        return np.transpose(block, self.perm)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        inter = np.transpose(param, np.argsort(self.perm))
        return np.ascontiguousarray(inter.reshape(self.hf_shape))


def _param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """param path -> (HF names, layout). A layer template maps to the stacked param
    `layers.<rest>` and lists one HF tensor per layer, in layer order."""
    table = {}
    for hf, param, layout in KEY_MAP:
        if "{i}" in hf:
            table[param.replace("{i}.", "")] = (tuple(hf.format(i=i) for i in range(cfg.num_layers)), layout)
        else:
            table[param] = ((hf,), layout)
    return table


def _unstacked(names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[bool, tuple[str, ...], tuple[int, ...]]:
    """(stacked?, per-layer logical axes, per-layer shape) of a param."""
    if names and names[0] == "layers":
        return True, names[1:], shape[1:]
    return False, names, shape


def _flat_params(state) -> list[tuple[str, tuple, nnx.Variable]]:
    return [(".".join(str(k) for k in path), path, var) for path, var in nnx.to_flat_state(state)]


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


class CheckpointFilesError(ValueError):
    """A model directory's weight files are missing, or disagree with its config.json (the user's input)."""


class _Checkpoint:
    """The tensors of a HF checkpoint dir (single file or sharded index), opened lazily."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file():
            self.files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise CheckpointFilesError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
        self._open: dict[Path, object] = {}
        self._stack = stack

    def get_slice(self, name: str):
        f = self.files[name]
        if f not in self._open:
            if not f.is_file():
                raise CheckpointFilesError(f"tensor {name!r}: shard file {f.name} listed in the index is missing")
            self._open[f] = self._stack.enter_context(safe_open(f, framework="numpy"))
        return self._open[f].get_slice(name)


def load_pretrained(path, *, dtype="float32", param_dtype="float32", mesh=None, remat: str = "none") -> Transformer:
    """Reads a HF checkpoint dir (config.json + safetensors) into a Transformer.

    Params are stored in `param_dtype` (cast on each device's slice as it is
    read) and computed in `dtype`; with a mesh each param is placed directly
    into its sharding (`entrl.sharding.param_shardings`).
    """
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    param_dtype = jnp.dtype(param_dtype)
    abstract = nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(abstract_state, mesh)))
    table = _param_table(cfg)
    loaded, used = [], set()
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack)
        for name, key, var in _flat_params(abstract_state):
            hf_names, layout_str = table[name]
            shape = tuple(var.shape)
            stacked, names, layer_shape = _unstacked(var.get_metadata()["out_sharding"], shape)
            layout = _Layout(layout_str, names, layer_shape)
            tensors = []
            for hf_name in hf_names:
                if hf_name not in ckpt.files:
                    raise CheckpointFilesError(f"checkpoint {path} is missing tensor {hf_name!r} (needed for param {name})")
                tensor = ckpt.get_slice(hf_name)
                got = tuple(tensor.get_shape())
                if got != layout.hf_shape:
                    raise CheckpointFilesError(
                        f"tensor {hf_name!r} has shape {got} but config.json implies {layout.hf_shape}; "
                        "the checkpoint and its config.json disagree"
                    )
                tensors.append(tensor)
                used.add(hf_name)
            sharding = shardings[key].get_value() if mesh is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

            def fill(index, tensors=tuple(tensors), layout=layout, layer_shape=layer_shape, stacked=stacked):
                if not stacked:
                    return layout.read(tensors[0], index, layer_shape).astype(param_dtype)
                rows = range(*index[0].indices(len(tensors)))
                return np.stack([layout.read(tensors[i], index[1:], layer_shape) for i in rows]).astype(param_dtype)

            loaded.append((key, var.replace(jax.make_array_from_callback(shape, sharding, fill))))
    extra = sorted(k for k in ckpt.files if k not in used and not _IGNORED.match(k))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:  # some tied checkpoints store it anyway
        extra.remove("lm_head.weight")
    if extra:
        warnings.warn(f"load_pretrained({path}): {len(extra)} checkpoint tensors unused, e.g. {extra[:3]}",
                      stacklevel=2)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Transformer, path, *, max_shard_bytes: int = 4 * 2**30) -> None:
    """Writes config.json, generation_config.json and safetensors that transformers loads.

    Tensors keep the params' dtype; files are capped at `max_shard_bytes`
    (more than one file -> `model-0000k-of-0000n.safetensors` + index).
    """
    cfg = model.cfg
    path = Path(path)
    table = _param_table(cfg)
    params = _flat_params(nnx.state(model, nnx.Param))
    # (HF name, layout, param, layer index or None, bytes): one per HF tensor; a stacked param gives one per layer.
    entries = []
    for name, _, var in params:
        hf_names, layout_str = table[name]
        stacked, names, layer_shape = _unstacked(var.get_metadata()["out_sharding"], tuple(var.shape))
        layout = _Layout(layout_str, names, layer_shape)
        nbytes = math.prod(layer_shape) * jnp.dtype(var.get_value().dtype).itemsize
        for i, hf_name in enumerate(hf_names):
            entries.append((hf_name, layout, var, i if stacked else None, nbytes))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[4]
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for hf_name, layout, var, layer, nbytes in shard:
            # Every process joins the gather of a param spread over processes; only process 0 keeps it.
            value = _to_host(var.get_value() if layer is None else var.get_value()[layer])
            tensors[hf_name] = layout.to_hf(value)
            weight_map[hf_name] = fname
            total += nbytes
        if writer:
            save_file(tensors, path / fname, metadata={"format": "pt"})
    if not writer:
        return
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(jnp.dtype(params[0][2].get_value().dtype))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {k: v for k, v in (("bos_token_id", hf["bos_token_id"]), ("eos_token_id", hf["eos_token_id"]),
                             ("pad_token_id", hf["pad_token_id"])) if v is not None}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
