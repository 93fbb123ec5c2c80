"""Decoder-only LMs (Qwen2/2.5, Qwen3, Llama-3) in Flax NNX, and HF checkpoint I/O."""

from entrl.models.config import PRESETS, ModelConfig
from entrl.models.hf_io import CheckpointFilesError, load_pretrained, save_pretrained
from entrl.models.transformer import DECODE_AXES, K_CACHE_AXES, V_CACHE_AXES, KVCache, Transformer, create_model

__all__ = [
    "CheckpointFilesError",
    "DECODE_AXES",
    "K_CACHE_AXES",
    "KVCache",
    "V_CACHE_AXES",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "create_model",
    "load_pretrained",
    "save_pretrained",
]
