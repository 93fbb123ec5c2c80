"""Parity with HF transformers (torch, float32, CPU) on tiny random checkpoints
built by the test: load, save round trip, sharded index files, bf16, and the
errors that name the offending tensor."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from entrl.models import create_model, load_pretrained, save_pretrained  # noqa: E402

V = 211
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
HF_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=24, rope_theta=1e6, tie_word_embeddings=False),
    "llama3": lambda: transformers.LlamaConfig(
        **_COMMON, rope_theta=5e5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "qwen2_tied": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
}


def _batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, V, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def _rel_err(got, want, mask):
    real = mask.astype(bool)
    return float(np.abs(np.asarray(got, np.float32) - want)[real].max() / np.abs(want[real]).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (dir, HF reference logits of `_batch()`), one tiny random HF model per family."""
    torch.manual_seed(0)
    ids, mask = _batch()
    out = {}
    for name, make in HF_CONFIGS.items():
        model = transformers.AutoModelForCausalLM.from_config(make(), dtype=torch.float32).eval()
        with torch.no_grad():  # non-trivial biases and norm scales
            for p in model.parameters():
                p.normal_(0.0, 0.1)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (d, _hf_logits(model, ids, mask))
    return out


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    d, want = checkpoints[name]
    ids, mask = _batch()
    model = load_pretrained(d)
    assert model.cfg.arch == {"qwen2": "qwen2", "qwen3": "qwen3", "llama3": "llama", "qwen2_tied": "qwen2"}[name]
    got = _logits(model, jnp.asarray(ids), jnp.asarray(mask))
    assert _rel_err(got, want, mask) < 1e-4


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_save_pretrained_round_trip_through_transformers(checkpoints, name, tmp_path):
    d, want = checkpoints[name]
    ids, mask = _batch()
    save_pretrained(load_pretrained(d), tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _rel_err(_hf_logits(hf, ids, mask), want, mask) < 1e-5


def test_fresh_entrl_model_loads_in_transformers(tmp_path):
    """An entrl-initialised Qwen3 (head_dim != hidden/heads) saved and run by transformers."""
    from entrl.models import ModelConfig

    cfg = ModelConfig(arch="qwen3", vocab_size=V, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, eos_token_id=(3, 4))
    model = create_model(cfg, seed=3)
    save_pretrained(model, tmp_path)
    ids, mask = _batch()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = _hf_logits(hf, ids, mask)
    assert _rel_err(_logits(model, jnp.asarray(ids), jnp.asarray(mask)), want, mask) < 1e-4
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [3, 4]


def test_sharded_index_checkpoints(checkpoints, tmp_path):
    """Multi-file checkpoints, written by transformers and by entrl, load with the same logits."""
    d, want = checkpoints["qwen3"]
    ids, mask = _batch()
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    model = load_pretrained(tmp_path / "hf")
    assert _rel_err(_logits(model, jnp.asarray(ids), jnp.asarray(mask)), want, mask) < 1e-4

    save_pretrained(model, tmp_path / "ours", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "ours").glob("model-*.safetensors"))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert _rel_err(_hf_logits(back, ids, mask), want, mask) < 1e-5
    assert _rel_err(_logits(load_pretrained(tmp_path / "ours"), jnp.asarray(ids), jnp.asarray(mask)), want, mask) < 1e-4


def test_bfloat16_load_and_save(checkpoints, tmp_path):
    d, want = checkpoints["qwen2"]
    ids, mask = _batch()
    model = load_pretrained(d, dtype="bfloat16", param_dtype="bfloat16")
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in __import__("jax").tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    got = _logits(model, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.float32 and _rel_err(got, want, mask) < 5e-2
    # float32 master weights under bfloat16 compute: the same bfloat16 forward (weights cast at use).
    mixed = load_pretrained(d, dtype="bfloat16")
    assert {x.dtype for x in __import__("jax").tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(np.asarray(_logits(mixed, jnp.asarray(ids), jnp.asarray(mask))), np.asarray(got))
    save_pretrained(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(hf, ids, mask)[mask.astype(bool)],
                               np.asarray(got)[mask.astype(bool)], atol=5e-2 * np.abs(want).max())


# ---------------------------------------------------------------------------
# Errors name what is wrong
# ---------------------------------------------------------------------------


def _copy(checkpoints, tmp_path, name="qwen2"):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints[name][0], dst)
    return dst


def test_unsupported_architecture(checkpoints, tmp_path):
    d = _copy(checkpoints, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt_neox"):
        load_pretrained(d)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(d)


def test_wrong_shape_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros((7,), np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias.*\(7,\)"):
        load_pretrained(d)


def test_no_weights_file(checkpoints, tmp_path):
    d = _copy(checkpoints, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(d)


class _RecordingSlice:
    """Stands in for safetensors' lazy slice and records what was read."""

    def __init__(self, array):
        self.array, self.reads = array, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def test_layout_reads_only_the_requested_block():
    """Per-device reads touch only that device's rows/columns of the HF tensor,
    and equal slicing the fully transformed param (incl. a cut inside a `*`-group)."""
    from entrl.models.hf_io import _Layout

    H, Dh, D = 4, 6, 10
    hf = np.arange(H * Dh * D, dtype=np.float32).reshape(H * Dh, D)  # q_proj.weight [H*Dh, D]
    layout = _Layout("q_heads*head_dim,embed", ("embed", "q_heads", "head_dim"), (D, H, Dh))
    full = np.transpose(hf.reshape(H, Dh, D), (2, 0, 1))
    np.testing.assert_array_equal(layout.to_hf(full), hf)
    for index in [(slice(0, 5), slice(2, 4), slice(None)), (slice(None), slice(1, 2), slice(3, 6))]:
        tensor = _RecordingSlice(hf)
        np.testing.assert_array_equal(layout.read(tensor, index, full.shape), full[index])
        rows, cols = tensor.reads[0]
        assert (rows.stop - rows.start) == (index[1].stop - index[1].start) * Dh  # only those heads
        assert cols == (index[0] if index[0] != slice(None) else slice(0, D))
