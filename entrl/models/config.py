"""ModelConfig: the shape of one decoder-only transformer, and its HF config.json form.

Design decisions:
- One frozen, hashable dataclass covers the three supported families; the
  differences are flags, not subclasses: Qwen2/2.5 = `qkv_bias`, Qwen3 =
  `qk_norm` + an explicit `head_dim`, Llama-3 = `rope_scaling` ("llama3").
  Hashable so it can be a static argument of `jax.jit`.
- `from_hf_dict` reads both the classic config.json keys (`rope_theta`,
  `rope_scaling`) and the transformers-v5 form (`rope_parameters`), and refuses
  what the decoder does not implement (sliding windows, other RoPE types, MLP
  biases, non-SiLU activations) with an error naming the key, instead of
  silently computing something else.
- `to_hf_dict` writes the classic keys, which every transformers version reads.
- `PRESETS` hold the published config.json values of the paper's models, so
  their shapes can be checked without downloading anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ARCHS = ("qwen2", "qwen3", "llama")

_HF_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # decoder family: qwen2 | qwen3 | llama
    vocab_size: int  # rows of the embedding table (V)
    hidden_size: int  # residual stream width (D)
    intermediate_size: int  # SwiGLU MLP width (F)
    num_layers: int  # decoder layers (L)
    num_heads: int  # query heads (H)
    num_kv_heads: int  # key/value heads (K); H must be a multiple of K (GQA)
    head_dim: int  # per-head width (Dh); may differ from D / H (Qwen3)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3 RoPE scaling as sorted (key, value) pairs, or None
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_word_embeddings: bool = False  # logits use the embedding table transposed (no lm_head)
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2/2.5)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 32768  # longest context the checkpoint was trained for
    bos_token_id: int | None = None  # beginning-of-sequence token id
    eos_token_id: int | tuple[int, ...] | None = None  # end-of-sequence token id(s)
    pad_token_id: int | None = None  # padding token id (None: the tokenizer decides)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r} is not supported; use one of {ARCHS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs H = K * groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}: RoPE needs an even head_dim")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("ModelConfig.rope_theta and rms_norm_eps must be positive")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.rope_scaling is not None:
            got = dict(self.rope_scaling)
            missing = [k for k in _LLAMA3_KEYS if k not in got]
            if missing or set(got) - set(_LLAMA3_KEYS):
                raise ValueError(
                    f"ModelConfig.rope_scaling={self.rope_scaling}: llama3 scaling needs exactly the keys {_LLAMA3_KEYS}"
                )

    # -- derived -----------------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty when unknown)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals the model's leaves)."""
        D, F, H, K, Dh, V = (self.hidden_size, self.intermediate_size, self.num_heads,
                             self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
        if self.qkv_bias:
            attn += H * Dh + 2 * K * Dh
        if self.qk_norm:
            attn += 2 * Dh
        layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + D

    # -- Hugging Face config.json ------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads a HF `config.json` dict (Qwen2/Qwen2.5, Qwen3, Llama); ValueError on what is unsupported."""
        arch = d.get("model_type")
        if arch not in ARCHS:
            raise ValueError(
                f"config.json model_type={arch!r} (architectures={d.get('architectures')}) is not supported; "
                f"entrl implements {ARCHS}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
        if d.get("use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=true is not supported; entrl uses full attention")
        if d.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=true is not supported")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        head_dim = d.get("head_dim") or hidden // heads
        rope = dict(d.get("rope_parameters") or {})
        legacy_scaling = d.get("rope_scaling")
        if legacy_scaling:
            rope.update(legacy_scaling)
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            rope_scaling = tuple(sorted((k, float(rope[k])) for k in _LLAMA3_KEYS))
        else:
            raise ValueError(f"config.json rope type {rope_type!r} is not supported; only default and 'llama3'")
        if arch == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=arch == "qwen3",
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that `transformers.AutoConfig` / `AutoModelForCausalLM` load."""
        if self.arch == "qwen2" and not self.qkv_bias:
            raise ValueError("a qwen2 config without qkv_bias has no HF equivalent; set qkv_bias=True")
        if self.arch == "qwen3" and not self.qk_norm:
            raise ValueError("a qwen3 config without qk_norm has no HF equivalent; set qk_norm=True")
        if self.arch != "qwen3" and self.qk_norm:
            raise ValueError(f"arch={self.arch!r} has no q/k norm in HF; use arch='qwen3'")
        d: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if self.arch != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.arch == "llama":
            d["mlp_bias"] = False
        if self.arch in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dict(self.rope_scaling)}
            d["rope_scaling"]["original_max_position_embeddings"] = int(d["rope_scaling"]["original_max_position_embeddings"])
        return d

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Reads `<path>/config.json`."""
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ValueError(f"no config.json in {path}: pass a Hugging Face checkpoint directory")
        return cls.from_hf_dict(json.loads(f.read_text()))


# Published config.json values (hub: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B,
# Qwen/Qwen2.5-Math-7B, Qwen/Qwen3-14B).
PRESETS: dict[str, ModelConfig] = {
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=131072,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen2.5-math-7b": ModelConfig(
        arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=4096,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen3-14b": ModelConfig(
        arch="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_layers=40,
        num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_id=151645,
    ),
}


# Hub ids of the paper's models -> their `PRESETS` entry, so `entrl plan` resolves them without a download.
HUB_PRESETS: dict[str, str] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-r1-distill-qwen-1.5b",
    "Qwen/Qwen2.5-Math-7B": "qwen2.5-math-7b",
    "Qwen/Qwen3-14B": "qwen3-14b",
}
