"""Meshes and the logical-axis table on 8 fake CPU devices (tests/conftest.py):
a 2x2x2 (data, fsdp, tensor) mesh gives the same logits as one device, and
load_pretrained places every param straight into its sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from entrl.models import ModelConfig, Transformer, create_model, load_pretrained, save_pretrained
from entrl.sharding import batch_sharding, logical_to_spec, make_mesh, param_shardings, shard_batch, shard_model

CFG = ModelConfig(arch="qwen2", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, CFG.vocab_size, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0
    return ids, mask


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def test_make_mesh_axes_and_fill(mesh):
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(fsdp=2).shape) == {"data": jax.device_count() // 2, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, match",
    [(dict(data=3), "3\\*1\\*1 = 3 but there are 8 devices"), (dict(fsdp=3), "not divisible"),
     (dict(data=-1, tensor=-1), "only one"), (dict(tensor=0), "tensor=0")],
)
def test_make_mesh_errors_say_what_to_change(sizes, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(devices=jax.devices()[:8], **sizes)


def test_logical_to_spec(mesh):
    assert logical_to_spec(("embed", "q_heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    # 1 KV head cannot be split over tensor=2: replicated instead.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    # batch of 2 rows: only the data axis divides it.
    assert logical_to_spec(("batch", None), (2, 5), mesh) == P("data", None)
    with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
        logical_to_spec(("heads",))


def test_create_model_sharded_equals_unsharded_and_logits_match(mesh, model, batch):
    sharded = create_model(CFG, seed=0, mesh=mesh)
    assert sharded.layers.attn.q_kernel[...].sharding.spec == P(None, "fsdp", "tensor", None)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = batch
    want = _logits(model, jnp.asarray(ids), jnp.asarray(mask))
    with jax.set_mesh(mesh):
        ids_s, mask_s = shard_batch((ids, mask), mesh)
        assert ids_s.sharding.spec == P(("data", "fsdp"), None)
        got = _logits(sharded, ids_s, mask_s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_under_mesh(mesh, model, batch):
    ids, mask = batch
    B, T = ids.shape
    sharded = shard_model(nnx.clone(model), mesh)
    kv_mask = jnp.asarray(mask)
    positions = jnp.maximum(jnp.cumsum(kv_mask, -1) - 1, 0)

    @nnx.jit
    def prefill_then_step(m, cache):
        h0, cache = m.forward_cached(jnp.asarray(ids[:, :-1]), positions[:, :-1], cache, write_index=0, kv_mask_BxS=kv_mask)
        h1, cache = m.forward_cached(jnp.asarray(ids[:, -1:]), positions[:, -1:], cache, write_index=T - 1,
                                     kv_mask_BxS=kv_mask)
        return jnp.concatenate([h0, h1], axis=1)

    want = nnx.jit(lambda m, i, a: m.hidden(i, a))(model, jnp.asarray(ids), kv_mask)
    with jax.set_mesh(mesh):
        got = prefill_then_step(sharded, sharded.init_cache(B, T))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)


def test_load_pretrained_places_params_in_their_shardings(mesh, model, tmp_path):
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, mesh=mesh)
    expected = {
        "embedding": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "layers.attn.q_kernel": P(None, "fsdp", "tensor", None),  # stacked layers: leading axis replicated
        "layers.attn.k_kernel": P(None, "fsdp", "tensor", None),
        "layers.attn.o_kernel": P(None, "tensor", None, "fsdp"),
        "layers.attn.q_bias": P(None, "tensor", None),
        "layers.mlp.gate_kernel": P(None, "fsdp", "tensor"),
        "layers.mlp.down_kernel": P(None, "tensor", "fsdp"),
        "final_norm.scale": P(None),
    }
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(loaded))}
    for name, spec in expected.items():
        assert flat[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), flat[name].ndim), name
    assert flat["layers.attn.q_kernel"].addressable_shards[0].data.shape == (CFG.num_layers, 32, 2, 16)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_param_shardings_of_abstract_state(mesh):
    abstract = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    shardings = param_shardings(nnx.state(abstract), mesh)
    flat = dict(nnx.to_flat_state(shardings))
    assert flat[("layers", "attn", "v_kernel")].get_value().spec == P(None, "fsdp", "tensor", None)


def test_shard_batch_and_batch_sharding(mesh):
    x = np.arange(8 * 3).reshape(8, 3)
    y = shard_batch({"x": x}, mesh)["x"]
    assert y.sharding == batch_sharding(mesh, 2)
    np.testing.assert_array_equal(np.asarray(y), x)
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp=4"):
        shard_batch(np.zeros((6, 2)), mesh)


def test_sampler_prompts_pad_until_the_rows_split():
    """A sampler call's prompts: padded until prompts x n rows split over the 8 data shards (split prompts
    when they divide, else replicated ones the sampler repeats into split rows); with slots, until the
    prompts themselves split (each shard refills its slots from its own prompts)."""
    from entrl.sharding import sampler_prompts

    mesh = make_mesh(data=-1)
    split, replicated = P(("data", "fsdp"), None), P()
    for problems, n, slots, want, spec in ((3, 2, 0, 4, replicated), (3, 8, 0, 3, replicated), (6, 4, 0, 6, replicated),
                                           (5, 1, 0, 8, split), (16, 2, 0, 16, split), (3, 8, 16, 8, split)):
        prompts, sharding = sampler_prompts(problems, n, mesh, slots=slots)
        assert (prompts, sharding.spec) == (want, spec), (problems, n, slots)
        assert prompts * n % 8 == 0
