"""Decoder-only LMs (Qwen2/2.5, Qwen3, Llama-3) in Flax NNX, and HF checkpoint I/O."""

from entrl.models.config import PRESETS, ModelConfig
from entrl.models.transformer import KV_CACHE_AXES, KVCache, Transformer, create_model

__all__ = [
    "KV_CACHE_AXES",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "create_model",
    "load_pretrained",
    "save_pretrained",
]


def __getattr__(name):  # hf_io is imported lazily until it lands; see below
    if name in ("load_pretrained", "save_pretrained"):
        from entrl.models import hf_io

        return getattr(hf_io, name)
    raise AttributeError(name)
