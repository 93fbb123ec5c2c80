"""The decoder: Qwen2/Qwen2.5, Qwen3 and Llama-3 in one Flax NNX module.

Per layer (pre-norm, as in all three families):
    x = x + Attn(RMSNorm(x)),  x = x + W_down(silu(W_gate h) * W_up h) with h = RMSNorm(x)
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)           (statistics in float32)
Attention is grouped-query: H query heads share K key/value heads (G = H / K),
    A = softmax(q k^T / sqrt(Dh) + mask) v,  with RoPE applied to q and k.
Qwen2 adds a bias to q/k/v; Qwen3 RMS-normalises each q/k head (over Dh) before
RoPE and has an explicit head_dim; Llama-3 rescales the RoPE frequencies
(`rope_inv_freq`).

Design decisions:
- Kernels keep the head axes ([D, H, Dh], [H, Dh, D]) so every param carries a
  logical axis name per dimension (`out_sharding` metadata, never applied here:
  `entrl.sharding` maps names to mesh axes in one table). Eager sharding is
  off so the model builds the same with or without a mesh in context.
- Masked logits get the most negative finite float, not -inf: a fully masked
  row (a left-padding query) becomes a uniform average, finite, never NaN.
- Positions default to `cumsum(mask) - 1` (clipped at 0), so a left-padded
  prompt gets the same RoPE phases as the unpadded one.
- The KV cache holds per layer one keys array, transposed [B, K, Dh, S], and
  one values array [B, K, S, Dh], updated in place with
  `lax.dynamic_update_slice` at a traced `write_index` (one per row for
  continuous batching: a vmapped update, i.e. a scatter of row blocks); the
  caller owns the slot mask. Heads-major, so both attention matmuls read the
  cache as it lies: with the slot-major [B, S, K, Dh] layout XLA:CPU copied every layer's k and
  v into this order on every decode step. Keys transposed because q k^T then
  contracts a non-minor axis, the layout XLA:CPU handles best for one query
  per row (with `Attention.attend`'s T-free einsums for that case; compared in
  benchmarks/bench_sampler.py). One array per
  layer, not a stacked [L, ...] one, because XLA copies a layer slice of a
  stacked array before a matmul reads it (and inside a while loop then copied
  the whole stack too).
  The cached forward shares every line of the layer with the full forward, so
  the two cannot drift apart.
- Decoding may run on `decode_weights()` instead of the kernels: the same
  values re-laid out once per sampling call (q/k/v fused into one matrix,
  gate/up into one, all 2-D [out, in]): fewer, larger matmuls at decode batch
  sizes. The parameters keep the checkpoint-shaped layout, so
  loading, sharding and training never see the fused form.
- Softmax and logits are float32 whatever the compute dtype; hidden states are
  returned in the compute dtype so token statistics can chunk the unembedding.
- The decoder layers' params are stacked along a leading "layers" axis and the
  full forward is one `lax.scan` over them, so a deep model compiles like one
  layer and a remat policy applies to every layer; `hf_io` maps each
  checkpoint tensor to its slice of the stack.
- LoRA (`lora=LoRASpec`, `entrl.models.lora`): each targeted projection adds
  s (x A) B in the full forward; `decode_weights()` merges W + s A B instead.
Left out on purpose: sliding-window attention, MoE, dropout, bias in the MLP.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

from entrl.models.config import ModelConfig
from entrl.models.lora import ATTN_TARGETS, MLP_TARGETS, LoRASpec, adapters_for
from entrl.sharding import logical_to_spec, param_shardings

# Logical axes of each layer's cached keys (stored transposed) and values (for `entrl.sharding.logical_to_spec`).
K_CACHE_AXES = ("batch", "kv_heads", "head_dim", "cache_seq")
V_CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")

_NEG = float(np.finfo(np.float32).min)
_init_normal = nnx.initializers.normal(0.02)


@struct.dataclass
class KVCache:
    """Per layer one keys array k [B, K, Dh, S] (transposed) and one values array v [B, K, S, Dh]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def slots(self) -> int:
        """S, the number of token slots."""
        return self.v[0].shape[2]

    def map(self, fn) -> KVCache:
        """A cache of `fn(array, logical_axes)` for every array (`K_CACHE_AXES` / `V_CACHE_AXES`)."""
        return KVCache(k=tuple(fn(x, K_CACHE_AXES) for x in self.k), v=tuple(fn(x, V_CACHE_AXES) for x in self.v))


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _init(rngs: nnx.Rngs, lead: tuple[int, ...], shape: tuple[int, ...], param_dtype) -> jax.Array:
    """N(0, 0.02) of shape lead + shape (lead = (num_layers,) for the stacked decoder layers)."""
    return _init_normal(rngs.params(), lead + shape, param_dtype)


def _names(lead: tuple[int, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    return ("layers",) * len(lead) + names


# The sampler's copy of the weights (`Transformer.decode_weights`), [out, in] matrices in the compute
# dtype: sharded over the tensor axis only. It is gathered across data/fsdp once per sampler call, so
# the decode loop's matmuls read local weights; left to propagation, XLA gathered each layer's float32
# params instead and kept every layer's copies live through the loop (README, "Memory").
DECODE_AXES = {"qkv": ("q_heads", "act_embed"), "o": ("act_embed", "q_heads"), "gate_up": ("mlp", "act_embed"),
               "down": ("act_embed", "mlp"), "unembed": ("vocab", "act_embed")}


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding when a mesh is in context (no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return lax.with_sharding_constraint(x, logical_to_spec(names, shape=x.shape, mesh=mesh))


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple[tuple[str, float], ...] | None) -> np.ndarray:
    """Inverse frequencies [Dh/2]: theta^(-2i/Dh), optionally with llama3 scaling.

    Llama-3 scaling (Meta's `apply_scaling`): with wavelength w = 2 pi / f and
    original context C, low/high wavelength bounds C/low_freq_factor and
    C/high_freq_factor: w > C/low -> f / factor; w < C/high -> f; in between
    a linear blend (1 - s) f / factor + s f with s = (C/w - low) / (high - low).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    s = dict(scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates the two halves of each head (HF `rotate_half` layout) by angle pos * f."""
    angle_BxTxF = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angle_BxTxF)[:, :, None, :], jnp.sin(angle_BxTxF)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxDh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxDh.dtype)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, lead: tuple[int, ...] = ()):
        self.scale = _param(jnp.ones(lead + (dim,), param_dtype), _names(lead, ("norm",)))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """`scale`: the weight to use instead of the module's own (decoding passes its copy)."""
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...] if scale is None else scale
        return scale.astype(self.dtype) * y.astype(self.dtype)


class _Projections(nnx.Module):
    """Kernels `<name>_kernel`, optionally adapted by `self.lora[name]` (`entrl.models.lora.Adapter`)."""

    lora: nnx.Dict | None
    dtype: jnp.dtype

    def _kernel(self, name: str) -> jax.Array:
        """The kernel as the model computes with it: W, or W + s A B (float32) when adapted."""
        w = getattr(self, f"{name}_kernel")[...]
        return w if self.lora is None or name not in self.lora else self.lora[name].merged(w)

    def _adapted(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """y = x W, plus s (x A) B when `name` has an adapter."""
        return y if self.lora is None or name not in self.lora else y + self.lora[name](x, self.dtype)


class Attention(_Projections):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, lead: tuple[int, ...] = (),
                 lora: LoRASpec | None = None):
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kernel = lambda shape, names: _param(_init(rngs, lead, shape, param_dtype), _names(lead, names))
        zeros = lambda shape, names: _param(jnp.zeros(lead + shape, param_dtype), _names(lead, names))
        self.q_kernel = kernel((D, H, Dh), ("embed", "q_heads", "head_dim"))
        self.k_kernel = kernel((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.v_kernel = kernel((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.o_kernel = kernel((H, Dh, D), ("q_heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = zeros((H, Dh), ("q_heads", "head_dim"))
            self.k_bias = zeros((K, Dh), ("kv_heads", "head_dim"))
            self.v_bias = zeros((K, Dh), ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, lead=lead)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, lead=lead)
        # name -> (kernel shape, logical axes, input axes) of the kernels an adapter may target
        kernels = {"q": ((D, H, Dh), ("embed", "q_heads", "head_dim"), 1),
                   "k": ((D, K, Dh), ("embed", "kv_heads", "head_dim"), 1),
                   "v": ((D, K, Dh), ("embed", "kv_heads", "head_dim"), 1),
                   "o": ((H, Dh, D), ("q_heads", "head_dim", "embed"), 2)}
        self.lora = adapters_for(ATTN_TARGETS, kernels, lora, rngs=rngs, lead=lead)
        self.cfg = cfg
        self.dtype = dtype

    def decode_weights(self) -> dict[str, jax.Array]:
        """The projections re-laid out for decoding (see `Transformer.decode_weights`).

        2-D [out, in] matrices: qkv [K*(G+2)*Dh, D] holds per kv group its G
        query heads, then its key and value head (so a tensor-sharded kv-head
        axis stays local); o is [D, H*Dh]. 2-D because XLA:CPU transposes a
        higher-rank [out..., in] operand back to [in, out] before the matmul.
        """
        cfg, dt = self.cfg, self.dtype
        D, K, Dh = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
        # Cast first: the re-layout then moves compute-dtype (not float32) values between devices.
        q_DxKxGxDh = self._kernel("q").astype(dt).reshape(D, K, -1, Dh)
        k_DxKx1xDh, v_DxKx1xDh = self._kernel("k").astype(dt)[:, :, None], self._kernel("v").astype(dt)[:, :, None]
        qkv_DxKxJxDh = jnp.concatenate([q_DxKxGxDh, k_DxKx1xDh, v_DxKx1xDh], axis=2)
        w = dict(
            qkv=_constrain(qkv_DxKxJxDh.transpose(1, 2, 3, 0).reshape(-1, D), DECODE_AXES["qkv"]),
            o=_constrain(self._kernel("o").astype(dt).reshape(-1, D).T, DECODE_AXES["o"]),
        )
        if cfg.qkv_bias:
            q_bias_KxGxDh = self.q_bias[...].astype(dt).reshape(K, -1, Dh)
            k_bias_Kx1xDh, v_bias_Kx1xDh = self.k_bias[...].astype(dt)[:, None], self.v_bias[...].astype(dt)[:, None]
            w["qkv_bias"] = jnp.concatenate([q_bias_KxGxDh, k_bias_Kx1xDh, v_bias_Kx1xDh], axis=1)
        if cfg.qk_norm:
            w["q_norm"], w["k_norm"] = self.q_norm.scale[...].astype(dt), self.k_norm.scale[...].astype(dt)
        return w

    def qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, w: dict[str, jax.Array] | None = None):
        """Projects to q [B,T,H,Dh], k and v [B,T,K,Dh]; q/k norm (Qwen3) then RoPE.

        With `w` (`decode_weights()`) the three projections are one matmul.
        """
        cfg, dt = self.cfg, self.dtype
        if w is None:
            q = self._adapted("q", x_BxTxD, jnp.einsum("btd,dhk->bthk", x_BxTxD, self.q_kernel[...].astype(dt)))
            k = self._adapted("k", x_BxTxD, jnp.einsum("btd,dhk->bthk", x_BxTxD, self.k_kernel[...].astype(dt)))
            v = self._adapted("v", x_BxTxD, jnp.einsum("btd,dhk->bthk", x_BxTxD, self.v_kernel[...].astype(dt)))
            if cfg.qkv_bias:
                q = q + self.q_bias[...].astype(dt)
                k = k + self.k_bias[...].astype(dt)
                v = v + self.v_bias[...].astype(dt)
        else:
            B, T = x_BxTxD.shape[:2]
            qkv_BxTxN = jnp.einsum("btd,nd->btn", x_BxTxD, w["qkv"])
            qkv_BxTxKxJxDh = qkv_BxTxN.reshape(B, T, cfg.num_kv_heads, -1, cfg.head_dim)
            if cfg.qkv_bias:
                qkv_BxTxKxJxDh = qkv_BxTxKxJxDh + w["qkv_bias"]
            q = qkv_BxTxKxJxDh[:, :, :, :-2].reshape(B, T, cfg.num_heads, cfg.head_dim)
            k, v = qkv_BxTxKxJxDh[:, :, :, -2], qkv_BxTxKxJxDh[:, :, :, -1]
        if cfg.qk_norm:
            w = w or {}
            q, k = self.q_norm(q, w.get("q_norm")), self.k_norm(k, w.get("k_norm"))
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq), v

    def attend(self, q_BxTxHxDh, kT_BxKxDhxS, v_BxKxSxDh, mask_BxTxS, w: dict | None = None) -> jax.Array:
        """softmax(q k^T / sqrt(Dh), masked) v, then the output projection -> [B,T,D].

        Keys come transposed ([B,K,Dh,S]) and values heads-major ([B,K,S,Dh]):
        the KV cache's layouts. With one query per row (decoding, T = 1) the
        einsums drop the T axis: with it XLA:CPU laid the p v product out as
        [B,K,Dh,G] batched matmuls (benchmarks/bench_sampler.py compares the
        two).
        """
        B, T, H, Dh = q_BxTxHxDh.shape
        K = kT_BxKxDhxS.shape[1]
        dt = self.dtype
        t = "t" if T > 1 else ""
        q = q_BxTxHxDh.reshape((B, T, K, H // K, Dh) if t else (B, K, H // K, Dh))
        mask = mask_BxTxS[:, None, None] if t else mask_BxTxS[:, None, None, 0]  # [B,1,1,(T,)S]
        logits = jnp.einsum(
            f"b{t}kgd,bkds->bkg{t}s", q, kT_BxKxDhxS.astype(dt), preferred_element_type=jnp.float32
        ) * (Dh**-0.5)
        probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1).astype(dt)
        out = jnp.einsum(f"bkg{t}s,bksd->b{t}kgd", probs, v_BxKxSxDh.astype(dt))
        out_BxTxHxDh = out.reshape(B, T, H, Dh)
        if w is None:
            return self._adapted("o", out_BxTxHxDh,
                                 jnp.einsum("bthk,hkd->btd", out_BxTxHxDh, self.o_kernel[...].astype(dt)))
        return jnp.einsum("btn,dn->btd", out_BxTxHxDh.reshape(B, T, H * Dh), w["o"])


class MLP(_Projections):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, lead: tuple[int, ...] = (),
                 lora: LoRASpec | None = None):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kernel = lambda shape, names: _param(_init(rngs, lead, shape, param_dtype), _names(lead, names))
        self.gate_kernel = kernel((D, F), ("embed", "mlp"))
        self.up_kernel = kernel((D, F), ("embed", "mlp"))
        self.down_kernel = kernel((F, D), ("mlp", "embed"))
        kernels = {"gate": ((D, F), ("embed", "mlp"), 1), "up": ((D, F), ("embed", "mlp"), 1),
                   "down": ((F, D), ("mlp", "embed"), 1)}
        self.lora = adapters_for(MLP_TARGETS, kernels, lora, rngs=rngs, lead=lead)
        self.dtype = dtype

    def decode_weights(self) -> dict[str, jax.Array]:
        """gate and up interleaved [F*2, D] (one matmul; F stays the major, shardable
        axis), down [D, F]: 2-D [out, in] as in `Attention.decode_weights`."""
        dt = self.dtype
        gate_up_Fx2xD = jnp.stack([self._kernel("gate").astype(dt).T, self._kernel("up").astype(dt).T], axis=1)
        return dict(gate_up=_constrain(gate_up_Fx2xD.reshape(-1, gate_up_Fx2xD.shape[-1]), DECODE_AXES["gate_up"]),
                    down=_constrain(self._kernel("down").astype(dt).T, DECODE_AXES["down"]))

    def __call__(self, x_BxTxD: jax.Array, w: dict[str, jax.Array] | None = None) -> jax.Array:
        """SwiGLU; with `w` (`decode_weights()`) gate and up are one matmul."""
        dt = self.dtype
        if w is None:
            gate_BxTxF = self._adapted("gate", x_BxTxD, x_BxTxD @ self.gate_kernel[...].astype(dt))
            up_BxTxF = self._adapted("up", x_BxTxD, x_BxTxD @ self.up_kernel[...].astype(dt))
            hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
            return self._adapted("down", hidden_BxTxF, hidden_BxTxF @ self.down_kernel[...].astype(dt))
        B, T = x_BxTxD.shape[:2]
        gate_up_BxTxFx2 = jnp.einsum("btd,nd->btn", x_BxTxD, w["gate_up"]).reshape(B, T, -1, 2)
        hidden_BxTxF = jax.nn.silu(gate_up_BxTxFx2[..., 0]) * gate_up_BxTxFx2[..., 1]
        return jnp.einsum("btf,df->btd", hidden_BxTxF, w["down"])


class DecoderLayer(nnx.Module):
    """One pre-norm block; built with `lead=(L,)` it holds all L layers' params stacked (see `Transformer`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, lead: tuple[int, ...] = (),
                 lora: LoRASpec | None = None):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, lead=lead)
        self.input_norm = norm()
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, lead=lead, lora=lora)
        self.post_attn_norm = norm()
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, lead=lead, lora=lora)

    def decode_weights(self) -> dict[str, dict[str, jax.Array]]:
        """Everything the cached forward reads, so decoding never touches the (stacked) params."""
        dt = self.attn.dtype
        return dict(attn=self.attn.decode_weights(), mlp=self.mlp.decode_weights(),
                    input_norm=self.input_norm.scale[...].astype(dt),
                    post_attn_norm=self.post_attn_norm.scale[...].astype(dt))

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, *, write_index=None, weights=None):
        """One block. Full forward: cache=None. Cached: this layer's (k [B,K,Dh,S], v [B,K,S,Dh]), returned updated.

        weights: None, or this layer's `decode_weights()` to use instead of the kernels.
        """
        w = weights or {}
        q, k_new, v_new = self.attn.qkv(self.input_norm(x_BxTxD, w.get("input_norm")), positions_BxT, w.get("attn"))
        kT_BxKxDhxT, v_BxKxTxDh = k_new.transpose(0, 2, 3, 1), v_new.transpose(0, 2, 1, 3)
        if cache is None:
            kT_BxKxDhxS, v_BxKxSxDh = kT_BxKxDhxT, v_BxKxTxDh
        else:
            cache_k, cache_v = cache
            kT_BxKxDhxS = _write_slots(cache_k, kT_BxKxDhxT.astype(cache_k.dtype), write_index, axis=3)
            v_BxKxSxDh = _write_slots(cache_v, v_BxKxTxDh.astype(cache_v.dtype), write_index, axis=2)
            cache = (kT_BxKxDhxS, v_BxKxSxDh)
        x = x_BxTxD + self.attn.attend(q, kT_BxKxDhxS, v_BxKxSxDh, mask_BxTxS, w.get("attn"))
        x = x + self.mlp(self.post_attn_norm(x, w.get("post_attn_norm")), w.get("mlp"))
        return _constrain(x, ("batch", "seq", "act_embed")), cache


def _write_slots(cache_x: jax.Array, new_x: jax.Array, write_index: jax.Array, axis: int) -> jax.Array:
    """Writes new_x's T slots into cache_x along the slot `axis`, from `write_index`.

    A scalar index writes every row at the same slots (one in-place
    `dynamic_update_slice`); a [B] index writes row b from its own
    write_index[b] (a vmapped one: a scatter of B row blocks, also in place).
    """
    if write_index.ndim == 0:
        starts = [0] * cache_x.ndim
        starts[axis] = write_index
        return lax.dynamic_update_slice(cache_x, new_x, starts)
    return jax.vmap(lambda c, u, i: lax.dynamic_update_slice_in_dim(c, u, i, axis - 1))(cache_x, new_x, write_index)


#: `model.remat` policies: what the backward pass keeps of each layer's forward (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also the weight matmuls' outputs
}


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids, mask) -> logits [B,T,V]` (float32).

    `dtype` is the compute dtype (activations, matmul inputs), `param_dtype` the
    storage dtype of the parameters (float32 master weights under bfloat16
    compute: weights are cast where they are used). `remat` names a
    `REMAT_POLICIES` entry applied to each layer of the full forward. `lora`:
    adapters on the projections it targets (`entrl.models.lora`), or None.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none", lora: LoRASpec | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: must be one of {', '.join(REMAT_POLICIES)}")
        dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        V, D = cfg.vocab_size, cfg.hidden_size
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.lora_spec = lora
        self.embedding = _param(_init_normal(rngs.params(), (V, D), param_dtype), ("vocab", "embed"))
        # All layers in one module whose params carry a leading [num_layers] axis (logical "layers").
        self.layers = DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, lead=(cfg.num_layers,),
                                   lora=lora)
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(_init_normal(rngs.params(), (D, V), param_dtype), ("embed", "vocab"))

    # -- full forward --------------------------------------------------------

    def _embed(self, input_ids_BxT: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], input_ids_BxT, axis=0).astype(self.dtype)
        return _constrain(x, ("batch", "seq", "act_embed"))

    def hidden(self, input_ids_BxT, attention_mask=None, positions=None) -> jax.Array:
        """Final-RMSNorm'ed hidden states h [B,T,D] (compute dtype); `logits = h @ unembedding()`.

        The layers run as one `lax.scan` over the stacked layer params (one
        layer's program, compiled once), each step rematerialised in the
        backward pass according to `self.remat`.
        """
        B, T = input_ids_BxT.shape
        mask_BxT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)
        causal_TxT = jnp.tril(jnp.ones((T, T), bool))
        mask_BxTxS = causal_TxT[None] & mask_BxT[:, None, :]
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, positions, mask_BxTxS)[0], None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
        x, _ = lax.scan(one_layer, self._embed(input_ids_BxT), stacked)
        return self.final_norm(x)

    def unembedding(self) -> jax.Array:
        """W [D,V] with logits = h @ W: the embedding transposed when tied, else the lm_head kernel."""
        w = self.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.dtype)

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """h @ W in float32 accumulation -> [B,T,V] float32."""
        return jnp.einsum("btd,dv->btv", h_BxTxD, self.unembedding(), preferred_element_type=jnp.float32)

    def __call__(self, input_ids_BxT, attention_mask=None, positions=None) -> jax.Array:
        """Logits [B,T,V] float32. attention_mask: 1 = real token (left padding = 0)."""
        return self.logits(self.hidden(input_ids_BxT, attention_mask, positions))

    # -- KV cache ------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """Zeroed cache: per layer, k of shape [batch, K, Dh, max_len] and v of shape [batch, K, max_len, Dh]."""
        cfg = self.cfg

        def zeros(*shape):
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

        K, Dh = cfg.num_kv_heads, cfg.head_dim
        return KVCache(k=zeros(batch, K, Dh, max_len), v=zeros(batch, K, max_len, Dh))

    def decode_weights(self) -> tuple[dict[str, dict[str, jax.Array]], ...]:
        """Every layer's weights re-laid out for decoding, for `forward_cached(weights=...)`.

        Built once per sampling call: per layer, q/k/v fused into one matmul and
        gate/up into one, every kernel as [out, in], norm scales included, all in
        the compute dtype. This is the sampler's copy of the weights (in
        bfloat16 under bfloat16 compute, whatever the master dtype); the
        decode loop reads only it. One dict per layer (sliced off the stacked
        params here, outside any loop): XLA copies a layer slice of a stacked
        array before a matmul reads it, which inside the decode loop would be a
        copy per token.
        """
        graphdef, stacked = nnx.split(self.layers)
        one = lambda i: nnx.merge(graphdef, jax.tree.map(lambda x: x[i], stacked)).decode_weights()
        return tuple(one(i) for i in range(self.cfg.num_layers))

    def forward_cached(self, input_ids_BxT, positions_BxT, cache: KVCache, *, write_index, kv_mask_BxS, weights=None):
        """Writes the T new tokens at cache slots [write_index, write_index + T) and attends.

        write_index: a scalar (every row at the same slots) or [B] int (row b
        at its own slots; continuous batching, where each row of the cache is
        at its own length). Query t of row b (slot write_index[b] + t) sees
        slots s <= write_index[b] + t with kv_mask_BxS[b, s] == 1 (the caller
        zeroes left padding; slots past the query are hidden whatever they
        hold). `weights`: `decode_weights()`, or None to build them here.
        The layers are unrolled (one KV-cache array per layer; see the module
        docstring). Returns (final-normed h [B,T,D], updated cache).
        """
        T = input_ids_BxT.shape[1]
        S = cache.slots
        write_index = jnp.asarray(write_index, jnp.int32)
        query_slot = write_index[..., None] + jnp.arange(T, dtype=jnp.int32)  # [T] or [B, T]
        visible = jnp.arange(S, dtype=jnp.int32) <= query_slot[..., None]  # [T, S] or [B, T, S]
        mask_BxTxS = visible & (kv_mask_BxS[:, None, :] != 0)
        x = self._embed(input_ids_BxT)
        ks, vs = [], []
        weights = self.decode_weights() if weights is None else weights
        for k, v, w in zip(cache.k, cache.v, weights, strict=True):
            # `self.layers` supplies only the code and static settings: every weight comes from `w`.
            x, (k, v) = self.layers(x, positions_BxT, mask_BxTxS, (k, v), write_index=write_index, weights=w)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), KVCache(k=tuple(ks), v=tuple(vs))


def _host_init(path: str, names: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The module's initial value of one param, drawn with numpy: N(0, 0.02) for
    matrices and embeddings, 0 for biases, 1 for RMSNorm scales; deterministic
    per (seed, param path). A stacked layer param (leading axis "layers") is
    drawn layer by layer under the per-layer path `layers.<i>.<rest>`."""
    if names and names[0] == "layers":
        rest = path.split(".", 1)[1]
        return np.stack([_host_init(f"layers.{i}.{rest}", names[1:], shape[1:], seed) for i in range(shape[0])])
    if names == ("norm",):
        return np.ones(shape, np.float32)
    if path.endswith("_bias"):
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return rng.standard_normal(shape, np.float32) * np.float32(0.02)


def create_model(cfg: ModelConfig, *, seed: int = 0, dtype="float32", param_dtype="float32", mesh=None,
                 remat: str = "none") -> Transformer:
    """A randomly initialised Transformer: params stored in `param_dtype`, computed in `dtype`.

    Values are drawn on the host with numpy (`_host_init`, the same
    distributions as the module's initializers) rather than with jax.random:
    XLA compiles every random tensor's initializer separately, which made even
    a 2-layer test model slow to build. With a mesh every param is built
    straight into its sharding (`make_array_from_callback`, one param on the
    host at a time), so the unsharded model is never on a device; the values
    do not depend on the mesh.
    """
    param_dtype = jnp.dtype(param_dtype)
    graphdef, abstract_state = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, remat=remat))
    )
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(abstract_state, mesh)))
    leaves = []
    for key, var in nnx.to_flat_state(abstract_state):
        path, shape = ".".join(map(str, key)), tuple(var.shape)
        value = _host_init(path, var.get_metadata()["out_sharding"], shape, seed).astype(param_dtype)
        if mesh is None:
            array = jnp.asarray(value)
        else:
            array = jax.make_array_from_callback(shape, shardings[key].get_value(), lambda idx, v=value: v[idx])
        leaves.append((key, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
