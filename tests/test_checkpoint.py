"""Checkpoint round trips, retention, corruption fallback, the finite invariant, resharding."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from entrl.checkpoint import (
    COMMIT_MARKER,
    REPLICA_SLICE_MIN_BYTES,
    CheckpointManager,
    TreeIntegrityError,
    nonfinite_leaves,
    restore_tree,
    save_tree,
)


def _model_and_opt(seed=0):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    # One real update so Adam's moments and count are non-trivial.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _save(mgr, step, params, opt_state, **kw):
    return mgr.save(step, params=params, opt_state=opt_state,
                    meta={"step": step, "stage": 1, "metrics": {"reward": np.float32(0.25)}},
                    data_state={"epoch": 0, "position": 7 * step}, **kw)


def _targets(params, opt_state):
    return jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt_state)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_files(step_dir):
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")


def test_round_trip_pure_dict(tmp_path):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=2, async_save=False)
    assert mgr.restore_latest(params_target=params) is None  # empty dir: fresh start, no error
    assert _save(mgr, 3, params, opt_state)
    assert mgr.all_steps() == [3] and mgr.latest_step() == 3

    pt, ot = _targets(params, opt_state)
    got = mgr.restore_latest(params_target=pt, opt_state_target=ot)
    assert got.step == 3
    _assert_trees_equal(got.params, params)
    _assert_trees_equal(got.opt_state, opt_state)  # namedtuple Adam state comes back as such
    assert int(got.opt_state[0].count) == 1
    assert got.meta == {"step": 3, "stage": 1, "metrics": {"reward": 0.25}}
    assert got.data_state == {"epoch": 0, "position": 21}

    params_only = mgr.restore_latest(params_target=pt)  # export path: no optimizer needed
    assert params_only.opt_state is None
    _assert_trees_equal(params_only.params, params)
    mgr.close()


def test_round_trip_nnx_state(tmp_path):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    state = nnx.state(model)
    opt_state = optax.adamw(1e-2).init(state)  # Adam moments are nnx.States too
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save(1, params=state, opt_state=opt_state, meta={}, data_state={})

    abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0))))
    got = mgr.restore_latest(params_target=abstract, opt_state_target=jax.eval_shape(lambda: opt_state))
    assert isinstance(got.params, nnx.State) and isinstance(got.params["kernel"], nnx.Param)
    np.testing.assert_array_equal(got.params["kernel"][...], model.kernel[...])
    assert isinstance(got.opt_state[0].mu, nnx.State)
    nnx.update(model, got.params)  # the restored state plugs straight into a module
    mgr.close()


def test_a_step_written_with_an_rng_item_still_restores(tmp_path):
    """Older entrl saved the (never read) RNG key as a sixth item; those run directories still resume."""
    import orbax.checkpoint as ocp

    from entrl.checkpoint import INTEGRITY_ITEM, _json_digest, fingerprint_leaves

    params, opt_state = _model_and_opt()
    docs = {"rng": {"impl": None, "dtype": "uint32", "shape": [2], "data": [0, 5]}, "meta": {"step": 2},
            "data_state": {"process_count": 1, "states": [{"position": 3}]}}
    integrity = {"format": 1, "arrays": {"params": fingerprint_leaves(params), "opt_state": fingerprint_leaves(opt_state)},
                 "json": {name: _json_digest(doc) for name, doc in docs.items()}}
    old = CheckpointManager(tmp_path, async_save=False)
    old._manager.save(2, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        **{name: ocp.args.JsonSave(doc) for name, doc in docs.items()}, **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}))
    old.close()
    assert (tmp_path / "2" / "rng").is_dir()
    mgr = CheckpointManager(tmp_path, async_save=False)
    got = mgr.restore_latest(params_target=params, opt_state_target=opt_state, strict=True)
    assert got.step == 2 and got.meta == {"step": 2} and got.data_state == {"position": 3}
    _assert_trees_equal(got.params, params)
    mgr.close()


def test_keep_last_k_and_async(tmp_path):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=2, async_save=True)
    for step in (10, 20, 30):
        assert _save(mgr, step, params, opt_state)
    mgr.wait()
    assert mgr.all_steps() == [20, 30]
    assert not (tmp_path / "10").exists()
    assert not _save(mgr, 30, params, opt_state, force=True)  # already saved: skipped
    got = mgr.restore_latest(params_target=params, opt_state_target=opt_state)
    assert got.step == 30 and got.data_state["position"] == 210
    mgr.close()


@pytest.mark.parametrize("damage", ["delete", "truncate", "uncommitted", "meta"])
def test_corrupt_latest_falls_back(tmp_path, caplog, damage):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        _save(mgr, step, jax.tree.map(lambda p, step=step: p + step, params), opt_state)
    latest = tmp_path / "2"
    if damage == "delete":
        for f in _data_files(latest / "params"):
            f.unlink()
    elif damage == "truncate":
        for f in _data_files(latest / "opt_state"):
            with open(f, "r+b") as fh:
                fh.truncate(8)
    elif damage == "uncommitted":
        (latest / COMMIT_MARKER).unlink()
        assert mgr.all_steps() == [1]  # never listed as a checkpoint
    else:
        (latest / "meta" / "metadata").write_text('{"step": ')

    with caplog.at_level(logging.WARNING, logger="entrl.checkpoint"):
        got = mgr.restore_latest(params_target=params, opt_state_target=opt_state)
    assert got.step == 1
    _assert_trees_equal(got.params, jax.tree.map(lambda p: p + 1, params))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("entrl")]
    assert len(warned) == 1 and "step 2" in warned[0] and "falling back" in warned[0], warned  # one line of ours
    assert not latest.exists() and any(p.name.startswith("2.corrupt-") for p in tmp_path.iterdir())

    # The resumed run can write step 2 again, and that is what the next restore sees.
    assert _save(mgr, 2, params, opt_state)
    assert mgr.all_steps() == [1, 2]
    assert mgr.restore_latest(params_target=params, opt_state_target=opt_state).step == 2
    mgr.close()


def test_nothing_restorable(tmp_path, caplog):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 1, params, opt_state)
    for f in _data_files(tmp_path / "1" / "params"):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="entrl.checkpoint"):
        assert mgr.restore_latest(params_target=params, opt_state_target=opt_state) is None
    assert any("could be restored" in r.getMessage() for r in caplog.records)
    _save(mgr, 1, params, opt_state)
    (tmp_path / "1" / COMMIT_MARKER).unlink()
    with pytest.raises(RuntimeError, match="could be restored"):
        mgr.restore_latest(params_target=params, opt_state_target=opt_state, strict=True)
    mgr.close()


def test_target_mismatch_is_a_config_error(tmp_path):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 1, params, opt_state)
    wrong = {"kernel": jax.ShapeDtypeStruct((5, 3), jnp.float32), "bias": params["bias"]}
    with pytest.raises(ValueError, match="kernel stored"):
        mgr.restore_latest(params_target=wrong)
    assert mgr.all_steps() == [1]  # nothing was moved aside
    mgr.close()


def test_nonfinite_refused(tmp_path):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    bad = dict(params, bias=params["bias"].at[1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"non-finite.*bias"):
        _save(mgr, 1, bad, opt_state)
    bad_opt = jax.tree.map(lambda x: x * jnp.inf if x.dtype == jnp.float32 else x, opt_state)
    with pytest.raises(ValueError, match="opt_state"):
        _save(mgr, 1, params, bad_opt)
    assert mgr.all_steps() == [] and not (tmp_path / "1").exists()
    assert nonfinite_leaves({"a": jnp.ones(2), "n": jnp.arange(3)}) == []
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    mixed = {"mesh": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("x", "y"))),
             "pinned": jax.device_put(jnp.array([1.0, jnp.inf]), jax.devices()[3]),
             "loose": jnp.asarray(jnp.nan), "host": np.ones(2)}
    assert nonfinite_leaves(mixed) == ["['loose']", "['pinned']"]
    with pytest.raises(ValueError, match="JSON"):
        mgr.save(1, params=params, opt_state=opt_state, meta={"x": object()},
                 data_state={})
    mgr.close()


def test_restore_onto_different_mesh(tmp_path):
    devices = np.array(jax.devices()[:8])
    mesh_a = jax.sharding.Mesh(devices.reshape(2, 4), ("x", "y"))
    mesh_b = jax.sharding.Mesh(devices.reshape(4, 2), ("x", "y"))
    value = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    params = {"w": jax.device_put(value, NamedSharding(mesh_a, P("x", "y")))}
    opt_state = optax.adamw(1e-3).init(params)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(4, params=params, opt_state=opt_state, meta={}, data_state={})
    mgr.wait()

    sharding_b = NamedSharding(mesh_b, P("x", "y"))
    target = {"w": jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=sharding_b)}
    opt_target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=sharding_b if x.ndim == 2 else NamedSharding(mesh_b, P())),
        opt_state)
    got = mgr.restore_latest(params_target=target, opt_state_target=opt_target)
    assert got.params["w"].sharding == sharding_b
    assert got.opt_state[0].mu["w"].sharding == sharding_b
    np.testing.assert_array_equal(np.asarray(got.params["w"]), value)
    assert len({s.data.shape for s in got.params["w"].addressable_shards}) == 1
    assert got.params["w"].addressable_shards[0].data.shape == (16, 8)
    mgr.close()


def test_leftover_temp_dir_is_not_a_checkpoint(tmp_path):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 1, params, opt_state)
    mgr.close()
    os.makedirs(tmp_path / "5.orbax-checkpoint-tmp-123" / "params")
    mgr = CheckpointManager(tmp_path, async_save=False)
    assert mgr.all_steps() == [1]
    assert mgr.restore_latest(params_target=params, opt_state_target=opt_state).step == 1
    mgr.close()


# ---------------------------------------------------------------------------
# Silent corruption: the integrity record
# ---------------------------------------------------------------------------


def _wide_model_and_opt():
    """Leaves above OCDBT's 1 KiB inline limit, with random (incompressible) Adam moments."""
    model = nnx.Linear(32, 24, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.adamw(1e-2)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("item", ["params", "opt_state"])
@pytest.mark.parametrize("damage", ["flip4", "random64"])
def test_bytes_changed_inside_a_data_file_fall_back(tmp_path, caplog, item, damage):
    params, opt_state = _wide_model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        _save(mgr, step, jax.tree.map(lambda p, s=step: p + s, params), opt_state)
    # The largest data file this process wrote for the item: the compressed chunks of its biggest arrays
    # (the item's top-level d/ holds the OCDBT tree, whose damage was always caught as unreadable).
    target = max(_data_files(tmp_path / "2" / item / "ocdbt.process_0"), key=lambda f: f.stat().st_size)
    raw = bytearray(target.read_bytes())
    mid = len(raw) // 2
    if damage == "flip4":
        raw[mid:mid + 4] = bytes(b ^ 0xFF for b in raw[mid:mid + 4])
    else:
        raw[mid:mid + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(raw))

    with caplog.at_level(logging.WARNING, logger="entrl.checkpoint"):
        got = mgr.restore_latest(params_target=params, opt_state_target=opt_state)
    assert got.step == 1
    _assert_trees_equal(got.params, jax.tree.map(lambda p: p + 1, params))
    _assert_trees_equal(got.opt_state, opt_state)
    falls = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(falls) == 1 and "step 2" in falls[0] and "\n" not in falls[0] and len(falls[0]) < 600
    assert not (tmp_path / "2").exists() and any(p.name.startswith("2.corrupt-") for p in tmp_path.iterdir())
    mgr.close()


@pytest.mark.parametrize("damage", ["json_item", "integrity_deleted"])
def test_json_items_and_the_record_itself_are_checked(tmp_path, damage):
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    for step in (1, 2):
        _save(mgr, step, params, opt_state)
    if damage == "json_item":  # valid JSON, another value: only the digest can tell
        path = tmp_path / "2" / "data_state" / "metadata"
        path.write_text(path.read_text().replace('"position": 14', '"position": 15'))
    else:
        import shutil

        shutil.rmtree(tmp_path / "2" / "integrity")
    assert mgr.restore_latest(params_target=params, opt_state_target=opt_state).step == 1
    mgr.close()


def test_clean_restore_is_bitwise_across_dtypes_and_meshes(tmp_path):
    mesh_a = jax.make_mesh((2, 4), ("x", "y"))
    mesh_b = jax.make_mesh((8, 1), ("x", "y"))
    rng = np.random.default_rng(0)
    values = {"f32": rng.standard_normal((16, 8)).astype(np.float32),
              "bf16": rng.standard_normal((16, 8)).astype(jnp.bfloat16),
              "i32": rng.integers(-9, 9, (8, 4)).astype(np.int32),
              "u8": rng.integers(0, 255, (8,)).astype(np.uint8),
              "flag": np.array([True, False, True, True, False, True, False, False])}

    def put(mesh):
        return {k: jax.device_put(v, NamedSharding(mesh, P("x") if v.ndim == 1 else P("x", "y")))
                for k, v in values.items()}

    params = put(mesh_a)
    mgr = CheckpointManager(tmp_path, async_save=True)
    count = {"count": jnp.array(7, jnp.int32)}
    mgr.save(1, params=params, opt_state=count, meta={}, data_state={})
    mgr.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), put(mesh_b))
    got = mgr.restore_latest(params_target=target, opt_state_target=count)
    for k, v in values.items():
        assert got.params[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(got.params[k]).view(np.uint8), v.view(np.uint8))
    # Resuming with another model.dtype is a cast after a verified restore, not corruption.
    as_bf16 = dict(target, f32=jax.ShapeDtypeStruct((16, 8), jnp.bfloat16, sharding=target["f32"].sharding))
    again = mgr.restore_latest(params_target=as_bf16, opt_state_target=count)
    assert again.step == 1 and again.params["f32"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(again.params["f32"]), values["f32"].astype(jnp.bfloat16))
    mgr.close()


def test_fingerprint_sees_every_bit_and_every_position_but_not_the_mesh():
    from entrl.checkpoint import fingerprint_leaves

    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    base = fingerprint_leaves({"w": jnp.asarray(x)})
    bits = x.view(np.uint32).copy()
    seen = {tuple(base["w"][1:])}
    for bit in range(32):  # every single bit of one word
        flipped = bits.copy()
        flipped[3, 5] ^= np.uint32(1 << bit)
        fp = fingerprint_leaves({"w": jnp.asarray(flipped.view(np.float32))})["w"]
        assert fp[1] != base["w"][1] and fp[2] != base["w"][2]
        seen.add(tuple(fp[1:]))
    assert len(seen) == 33
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other positions
    assert fingerprint_leaves({"w": jnp.asarray(swapped)}) != base
    assert fingerprint_leaves({"w": jnp.asarray(x.T.copy().T)}) == base
    for spec in (P("x", "y"), P(None, "x"), P()):
        mesh = jax.make_mesh((4, 2), ("x", "y"))
        assert fingerprint_leaves({"w": jax.device_put(x, NamedSharding(mesh, spec))}) == base
    assert fingerprint_leaves({"w": jnp.asarray(x, jnp.bfloat16)})["w"][0] == "bfloat16"


def test_legacy_checkpoint_without_record_restores_with_a_warning(tmp_path, caplog):
    import json
    import shutil

    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 1, params, opt_state)
    shutil.rmtree(tmp_path / "1" / "integrity")  # what a checkpoint of entrl before the record looks like
    meta_path = tmp_path / "1" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_path.read_text())
    del meta["item_handlers"]["integrity"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="entrl.checkpoint"):
        got = mgr.restore_latest(params_target=params, opt_state_target=opt_state)
    assert got.step == 1
    _assert_trees_equal(got.params, params)
    assert any("no integrity record" in r.getMessage() for r in caplog.records)
    mgr.close()


def test_replicated_leaves_are_sliced_for_parallel_writes_only_when_large(tmp_path, monkeypatch):
    """Each replica writes a slice of a replicated leaf only from REPLICA_SLICE_MIN_BYTES per slice: a slice
    is an eager device op compiled per shape and offset, more costly than writing a small leaf whole."""
    from orbax.checkpoint._src.serialization import replica_slices

    sliced = []  # the shape of the leaf each slice was cut from
    real = replica_slices.ReplicaSlice.data

    def spy(self):
        if self.slice_args is not None:
            sliced.append(self.unsliced_data.shape)
        return real(self)

    monkeypatch.setattr(replica_slices.ReplicaSlice, "data", spy)
    replicated = NamedSharding(jax.make_mesh((8,), ("x",)), P())
    rows = REPLICA_SLICE_MIN_BYTES * 8 // (4 * 256)  # float32 [rows, 256]: exactly the minimum per slice of 8
    params = {"small": jax.device_put(jnp.arange(64.0).reshape(8, 8), replicated),
              "large": jax.device_put(jnp.ones((rows, 256)), replicated)}
    opt_state = {"count": jax.device_put(jnp.int32(3), replicated)}
    mgr = CheckpointManager(tmp_path / "ckpt", async_save=False)
    _save(mgr, 1, params, opt_state)
    mgr.wait()
    assert sliced == [(rows, 256)] * 8  # the large leaf, in 8 slices (one per replica); the small ones whole
    pt, ot = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
              for t in (params, opt_state))
    restored = mgr.restore_latest(params_target=pt, opt_state_target=ot)
    mgr.close()
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)


def test_reading_a_run_logs_no_warning(tmp_path, caplog):
    """`entrl export` and `model.path=<run dir>` read through a read-only manager: orbax's notices that the
    directory is read-only (two absl WARNING lines before any message of entrl's) are not shown."""
    params, opt_state = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep=2, async_save=False)
    assert _save(mgr, 1, params, opt_state)
    mgr.close()
    with caplog.at_level(logging.INFO):
        reader = CheckpointManager(tmp_path, read_only=True)
        assert reader.restore_latest(params_target=_targets(params, opt_state)[0]).step == 1
        reader.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_saved_tree_is_checked_on_restore(tmp_path):
    """The reference policy of a restarted curriculum stage (`save_tree`): fingerprints beside it, so 4 flipped
    bytes inside its data are a TreeIntegrityError on restore, not a silently different KL target."""
    params, opt_state = _wide_model_and_opt()
    tree = {"params": params, "mu": opt_state[0].mu}  # random moments: incompressible chunks
    save_tree(tmp_path / "ref", tree)
    assert (tmp_path / "ref.integrity.json").exists()
    _assert_trees_equal(restore_tree(tmp_path / "ref", tree), tree)
    target = max((f for f in (tmp_path / "ref").rglob("*") if f.is_file() and f.parent.name == "d"
                  and "ocdbt.process_" in str(f)), key=lambda f: f.stat().st_size)
    raw = bytearray(target.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4] = bytes(b ^ 0xFF for b in raw[mid:mid + 4])
    target.write_bytes(bytes(raw))
    with pytest.raises(TreeIntegrityError, match="integrity check failed: .* changed on disk"):
        restore_tree(tmp_path / "ref", tree)
