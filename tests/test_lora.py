"""LoRA (`entrl.models.lora`): adapters on the stacked decoder, only they train, the KL reference is the base,
checkpoints hold the adapters (resume is exact), `policy/` and `entrl export` are merged plain HF checkpoints
that transformers runs with the same logits, and `entrl plan` counts the memory LoRA saves.

The training runs use the tiny demo shapes of tests/test_trainer.py (4 prompts x 4 samples x 12 tokens on
the 8 test devices as data 4 x tensor 2), so they share its compiled sampler and log-prob programs.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from doubles import ParityVerifier
from flax import nnx

from entrl import cli
from entrl import config as C
from entrl import plan as P
from entrl.build import build_tokenizer
from entrl.checkpoint import CheckpointManager
from entrl.metrics import read_metrics
from entrl.models import ModelConfig, create_model, load_pretrained, lora
from entrl.rl import step as S
from entrl.rl.setup import build_model, build_policy, setup
from entrl.rl.trainer import Trainer, reference_params
from entrl.sharding import make_mesh
from entrl.token_stats import compute_logprobs

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "rollout.n=4",
        "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.minibatch_prompts=2",
        "train.microbatch_per_shard=1", "data.arithmetic_train_size=64", "data.arithmetic_heldout_size=16",
        "curriculum.enabled=false", "reward.workers=1", "loss.kl_coef=0.001", "optim.lr=1e-2",
        "train.tensorboard=false", "train.length_buckets=1", "mesh.data=4", "mesh.tensor=2"]
LORA = ["model.lora_rank=4", "model.lora_alpha=8"]


def make_cfg(out_dir, *extra) -> C.RunConfig:
    return C.load_config(DEMO, TINY + LORA + [f"train.out_dir={out_dir}", *extra])


def max_diff(a, b) -> float:
    """The largest |a - b| over the leaves (on the host: the trees may live on different devices)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                  jax.tree.leaves(b)))


# ---------------------------------------------------------------------------
# The adapted model
# ---------------------------------------------------------------------------

_ARCHS = {
    "qwen2": {"arch": "qwen2", "qkv_bias": True},
    "qwen3": {"arch": "qwen3", "qk_norm": True},
    "llama": {"arch": "llama", "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}},
}


def tiny_model(arch: str):
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=12, **_ARCHS[arch])
    return create_model(cfg, seed=0)


def with_trained_adapters(model, spec, seed=1):
    """`model` with adapters whose B is random too (as after training), so every adapter changes the output."""
    adapted = lora.add_adapters(model, spec, seed=seed)
    graphdef, params = nnx.split(adapted)
    adapters, base = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    return nnx.merge(graphdef, lora.join(adapters, base))


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_adapters_start_at_the_base_decode_merged_and_merge_back(arch):
    """Fresh adapters (B = 0) leave the logits exactly the base's; trained ones change them, the merged
    decode path (W + s A B in `decode_weights`) agrees with the unmerged full forward, and
    `merge_adapters` is a plain model with the same logits."""
    base = tiny_model(arch)
    ids = jnp.asarray([[3, 17, 5, 42, 8, 11], [0, 0, 9, 30, 2, 7]], jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    want = base(ids, mask)
    spec = lora.LoRASpec(rank=3, alpha=6.0)
    fresh = lora.add_adapters(base, spec, seed=1)
    assert float(jnp.max(jnp.abs(fresh(ids, mask) - want))) == 0.0
    assert all(x is y for x, y in zip(jax.tree.leaves(lora.split(nnx.state(fresh))[1]),
                                      jax.tree.leaves(nnx.state(base))))  # the base is shared, not copied

    adapted = with_trained_adapters(base, spec)
    got = adapted(ids, mask)
    assert float(jnp.max(jnp.abs(got - want))) > 0.05
    cache = adapted.init_cache(2, 8)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    h, _ = adapted.forward_cached(ids, pos, cache, write_index=0, kv_mask_BxS=jnp.pad(mask, ((0, 0), (0, 2))))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(adapted.logits(h))[real], np.asarray(got)[real], atol=2e-5)
    merged = lora.merge_adapters(adapted)
    assert not lora.has_adapters(nnx.state(merged)) and merged.lora_spec is None
    assert len(jax.tree.leaves(nnx.state(merged))) == len(jax.tree.leaves(nnx.state(base)))
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), np.asarray(got), atol=2e-5)


def test_targets_choose_the_adapted_projections():
    base = tiny_model("qwen2")
    adapted = lora.add_adapters(base, lora.LoRASpec(rank=2, alpha=2.0, targets=("v", "down")))
    adapters = lora.split(nnx.state(adapted))[0]
    paths = sorted(".".join(map(str, k)) for k, _ in nnx.to_flat_state(adapters))
    assert paths == ["layers.attn.lora.v.a", "layers.attn.lora.v.b", "layers.mlp.lora.down.a",
                     "layers.mlp.lora.down.b"]
    # A [layers, in..., r], B [layers, r, out...]: stacked like the kernels, with their logical axes.
    v = adapted.layers.attn.lora["v"]
    assert v.a.shape == (2, 32, 2) and v.b.shape == (2, 2, 2, 12)
    assert v.b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "kv_heads", "head_dim")
    assert C.LORA_TARGETS == lora.TARGETS
    with pytest.raises(ValueError, match="targets"):
        lora.LoRASpec(rank=2, alpha=1.0, targets=("qkv",))


def test_startup_summary_names_the_adapters(tmp_path):
    from entrl.rl.summary import startup_summary
    from entrl.rl.trainer import step_settings

    cfg = make_cfg(tmp_path, "model.lora_targets=[v, down]", "model.lora_rank=2")
    adapted = lora.add_adapters(tiny_model("qwen2"), lora.LoRASpec(rank=2, alpha=8.0, targets=("v", "down")))
    params = nnx.state(adapted)
    text = startup_summary(cfg, params=params, mesh=None, pipeline=None, settings=step_settings(cfg),
                           out_dir=tmp_path, prompts=4)
    trained = sum(int(x.size) for x in jax.tree.leaves(lora.split(params)[0]))
    line = [x for x in text.splitlines() if x.split()[:1] == ["lora"]]
    assert line and "rank 2, alpha 8, on v down" in line[0] and f"{trained} trained params" in line[0], text
    base = startup_summary(C.load_config(DEMO, TINY), params=nnx.state(tiny_model("qwen2")), mesh=None,
                           pipeline=None, settings=step_settings(cfg), out_dir=tmp_path, prompts=4)
    assert not [x for x in base.splitlines() if x.split()[:1] == ["lora"]]


def test_merged_model_saves_a_checkpoint_transformers_runs_with_equal_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from entrl.models import save_pretrained

    adapted = with_trained_adapters(tiny_model("qwen3"), lora.LoRASpec(rank=4, alpha=8.0))
    save_pretrained(lora.merge_adapters(adapted), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.asarray([[3, 17, 5, 42, 8, 11]], np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(adapted(jnp.asarray(ids, jnp.int32))), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Training with adapters
# ---------------------------------------------------------------------------


def _capture(seen):
    """wrap an update to keep (ref_logp, old_logp, mask) of each RL step's first mini-batch."""
    def wrap(trainer, update):
        def capture(params, opt_state, mb, rng):
            if not seen or seen[-1][0] != trainer.step + 1:
                seen.append((trainer.step + 1, *(np.asarray(mb[k]) for k in ("ref_logp", "old_logp", "resp_mask"))))
            return update(params, opt_state, mb, rng)
        return capture
    return wrap


def run_trainer(cfg, *, max_steps=None, seen=None):
    trainer = Trainer(setup(cfg, verifier=ParityVerifier()))
    if seen is not None:
        trainer.update = _capture(seen)(trainer, trainer.update)
    try:
        trainer.run(max_steps=max_steps)
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(extra overrides, straight 4-step LoRA run dir, its Trainer, its first mini-batch per step,
    a run dir stopped after 2 steps)."""
    root = tmp_path_factory.mktemp("lora")
    extra = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=5", "loss.name=sent"]
    seen = []
    straight = run_trainer(make_cfg(root / "straight", *extra), seen=seen)
    half = run_trainer(make_cfg(root / "half", *extra), max_steps=2)
    assert straight.step == 4 and half.step == 2
    return extra, root / "straight", straight, seen, root / "half"


def test_only_the_adapters_train_and_are_optimised_and_checkpointed(lora_runs):
    extra, run, trainer, _, _ = lora_runs
    fresh = setup(make_cfg(run.parent / "fresh", *extra), verifier=ParityVerifier())
    adapters0, base0 = lora.split(fresh.params)
    adapters, base = lora.split(trainer.params)
    assert max_diff(base0, base) == 0.0  # the base never moves ...
    assert max_diff(adapters0, adapters) > 1e-3  # ... the adapters do
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert n_adapter < 0.5 * n_base
    # AdamW: two moments per adapter value and scalar counters, nothing of the base's size.
    opt_sizes = [x.size for x in jax.tree.leaves(trainer.opt_state)]
    assert sum(s for s in opt_sizes if s > 1) == 2 * n_adapter
    # A checkpoint holds the adapters alone: the full params are not a restore target it fits.
    like = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    mgr = CheckpointManager(run / "checkpoints", read_only=True)
    try:
        saved = mgr.restore_latest(params_target=like(adapters))
        assert saved.step == 4 and max_diff(saved.params, adapters) == 0.0
        with pytest.raises(ValueError, match="missing in checkpoint"):
            mgr.restore_latest(params_target=like(trainer.params))
    finally:
        mgr.close()


def test_reference_is_the_base_with_adapters_off_and_shares_its_arrays(lora_runs):
    """No second copy of the base: the reference's base arrays ARE the policy's. Its log-probs are the plain
    base model's (adapters disabled) and, at step 1, exactly the initial policy's; later the policy moves
    away from it while it stays put."""
    extra, run, _, seen, _ = lora_runs
    cfg = make_cfg(run.parent / "ref", *extra)
    comps = setup(cfg, verifier=ParityVerifier())
    ref_adapters, ref_base = lora.split(comps.ref_params)
    assert all(x is y for x, y in zip(jax.tree.leaves(ref_base), jax.tree.leaves(lora.split(comps.params)[1])))
    assert all(float(jnp.max(jnp.abs(b))) == 0.0 for b in jax.tree.leaves(nnx.filter_state(ref_adapters, nnx.PathContains("b"))))

    plain_cfg = C.replace(cfg, **{"model.lora_rank": 0})
    plain_graphdef, plain_params = build_model(plain_cfg, comps.mesh, comps.tokenizer)
    rng = np.random.default_rng(0)
    batch = {"prompt_ids": jnp.asarray(rng.integers(3, 20, (8, 6)), jnp.int32),
             "prompt_mask": jnp.ones((8, 6), jnp.int32), "resp_ids": jnp.asarray(rng.integers(3, 20, (8, 5)), jnp.int32)}
    stats = {"temperature": 1.0, "num_micro": 1, "chunk_size": 512}
    ref_logp, _ = compute_logprobs(comps.graphdef, comps.ref_params, batch, **stats)
    base_logp, _ = compute_logprobs(plain_graphdef, plain_params, batch, **stats)
    np.testing.assert_allclose(np.asarray(ref_logp), np.asarray(base_logp), atol=1e-6)

    gap = {step: float(np.abs(ref - old)[mask.astype(bool)].max()) for step, ref, old, mask in seen}
    assert sorted(gap) == [1, 2, 3, 4]
    assert gap[1] == 0.0  # the initial policy is the reference, exactly
    assert min(gap[s] for s in (2, 3, 4)) > 1e-4  # the adapters moved the policy; the reference stayed


def test_the_frozen_base_is_kept_in_the_compute_dtype(tmp_path):
    """Under bfloat16 compute the base is stored in bfloat16 (it is never updated and every use casts it
    there), the adapters in `model.param_dtype`; the reference shares the base."""
    cfg = make_cfg(tmp_path, "model.dtype=bfloat16", "model.demo_hidden=64")
    _graphdef, params = build_policy(cfg, make_mesh(data=4, tensor=2), build_tokenizer(cfg))
    adapters, base = lora.split(params)
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype("float32")}
    ref_base = lora.split(reference_params(cfg, params))[1]
    assert all(x is y for x, y in zip(jax.tree.leaves(ref_base), jax.tree.leaves(base)))


def test_resume_with_lora_is_exact(lora_runs, tmp_path):
    extra, straight, straight_trainer, _, half = lora_runs
    run = tmp_path / "resumed"
    shutil.copytree(half, run)
    resumed = run_trainer(make_cfg(run, *extra))
    assert [h["step"] for h in resumed.history] == [3, 4]
    a, b = read_metrics(straight), read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k not in ("time", "tokens_per_s") and not k.startswith("time/"):
                assert abs(v - rb[k]) <= 1e-6, (ra["step"], k, v, rb[k])
    assert max_diff(straight_trainer.params, resumed.params) <= 1e-6
    assert max_diff(straight_trainer.opt_state, resumed.opt_state) <= 1e-6


def test_resuming_with_other_lora_settings_is_a_one_line_error(lora_runs, tmp_path, capsys):
    extra, _, _, _, half = lora_runs
    run = tmp_path / "changed"
    shutil.copytree(half, run)
    args = ["train", DEMO, *TINY, *extra, f"train.out_dir={run}", "loss.name=sent"]
    assert cli.main([*args, "model.lora_rank=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.lora_rank was 4, now 0" in err and "--overwrite" in err, err


@pytest.mark.parametrize("override,needle", [
    ("model.lora_rank=-1", "model.lora_rank=-1: must be >= 0"),
    ("model.lora_alpha=0", "model.lora_alpha=0.0: must be > 0"),
    ("model.lora_targets=[q,qkv]", "'qkv' is not a projection; choose from q, k, v, o, gate, up, down"),
    ("model.lora_targets=[]", "at least one"),
    ("model.lora_targets=[v,v]", "each projection once"),
])
def test_lora_config_errors_are_one_line(tmp_path, capsys, override, needle):
    assert cli.main(["train", DEMO, *TINY, f"train.out_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("entrl: config error:") and needle in err, err
    assert not (tmp_path / "run").exists()


def test_peft_trl_and_verl_lora_names():
    """PEFT's target_modules (q_proj ... down_proj, all-linear) read as entrl's projections; TRL's and verl's option
    names set the model.lora_* keys."""
    verl = C.load_config(None, ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16",
                                "actor_rollout_ref.model.target_modules=all-linear"]).model
    assert (verl.lora_rank, verl.lora_alpha, verl.lora_targets) == (8, 16.0, list(C.LORA_TARGETS))
    trl = C.load_config(None, ["lora_r=4", "lora_alpha=8", "lora_target_modules=[q_proj, v_proj, down_proj]"])
    assert (trl.model.lora_rank, trl.model.lora_targets) == (4, ["q", "v", "down"])
    assert C.from_dict(C.to_dict(trl)) == trl  # the run's stored config reads back the same
    assert C.load_config(None, ["model.lora_targets=v_proj"]).model.lora_targets == ["v"]
    with pytest.raises(C.ConfigError, match="'qkv_proj' is not a projection"):
        C.load_config(None, ["model.lora_targets=[q_proj, qkv_proj]"])


@pytest.fixture(scope="module")
def cli_lora_run(tmp_path_factory):
    """`entrl train` with LoRA to the end (real verifier; `entropy_bonus` has a gradient without reward)."""
    out = tmp_path_factory.mktemp("lora_cli") / "run"
    assert cli.main(["train", DEMO, *TINY, *LORA, f"train.out_dir={out}", "train.steps=2", "loss.name=entropy_bonus",
                     "train.only_mixed_groups=false"]) == 0
    return out


def test_policy_and_export_are_merged_checkpoints_transformers_runs(cli_lora_run, tmp_path):
    """`policy/` (written at the end of the run) and `entrl export` of the last checkpoint are the same plain
    HF checkpoint (no adapter tensors), and transformers computes the trained adapted policy's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    run = cli_lora_run
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    tensors = {}
    for name in ("policy", "export"):
        path = run / "policy" if name == "policy" else tmp_path / "hf"
        with safe_open(path / "model.safetensors", framework="numpy") as f:
            tensors[name] = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors["policy"].keys() == tensors["export"].keys()
    assert not [k for k in tensors["policy"] if "lora" in k]
    for k, v in tensors["policy"].items():  # the export merges on another mesh: equal up to rounding
        np.testing.assert_allclose(tensors["export"][k], v, atol=1e-6, err_msg=k)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "policy", dtype=torch.float32).eval()

    # The trained policy: the base and the adapters of the last checkpoint, run unmerged by entrl.
    cfg = C.from_dict(json.loads((run / "entrl_run.json").read_text()))
    tok = build_tokenizer(cfg)
    from entrl.build import RunSource
    from entrl.rl.setup import restore_run_params

    mesh = make_mesh(data=1, fsdp=-1)
    graphdef, init = build_policy(cfg, mesh, tok)
    trained = restore_run_params(RunSource(run, cfg), (graphdef, init)).params
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    ids = np.asarray([tok.encode("12+7*3="), tok.encode("4*5-16=")], np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(trained, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    before = np.asarray(forward(init, jnp.asarray(ids, jnp.int32)))  # ... and it is not the untrained base
    assert np.abs(before - want).max() > 10 * max(np.abs(got - want).max(), 1e-5)


def test_a_lora_run_directory_is_a_model_path(cli_lora_run, tmp_path):
    """`model.path=<unfinished LoRA run>`: its base with its adapters merged in (then fresh adapters on top)."""
    run = tmp_path / "unfinished"
    shutil.copytree(cli_lora_run, run)
    shutil.rmtree(run / "policy")
    cfg = make_cfg(tmp_path / "next", f"model.path={run}", "model.lora_rank=0")
    mesh = make_mesh(data=1, fsdp=-1)
    _graphdef, params = build_model(cfg, mesh, build_tokenizer(cfg))
    policy = load_pretrained(cli_lora_run / "policy")
    assert not lora.has_adapters(params)
    assert max_diff(params, nnx.state(policy)) <= 1e-6


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

SMALL = ["model.demo_layers=2", "model.demo_hidden=64", "model.demo_heads=4", "rollout.n=4",
         "rollout.max_new_tokens=64", "rollout.prompt_buckets=[16]", "data.max_prompt_len=16",
         "train.prompts_per_step=8", "train.minibatch_prompts=4", "mesh.data=4", "mesh.tensor=2",
         "data.arithmetic_train_size=64", "loss.kl_coef=0.001", "train.length_buckets=1"]


def test_plan_counts_adapter_only_optimizer_and_reference():
    full = P.plan_run(C.load_config(DEMO, SMALL), with_eval=False, only=("update",))  # the state, and the update
    small = P.plan_run(C.load_config(DEMO, [*SMALL, "model.lora_rank=2"]), with_eval=False, only=("update",))
    f, s = full.per_device_bytes, small.per_device_bytes
    assert s["params"] > f["params"]  # the base plus its adapters
    assert s["optimizer"] < 0.1 * f["optimizer"] and s["reference"] < 0.1 * f["reference"]
    assert s["update_peak"] < f["update_peak"]
    note = next(n for n in small.notes if n.startswith("LoRA r=2"))
    assert "trained params" in note and "full fine-tuning holds" in note and "kept in float32" in note


def abstract_model(mcfg, spec):
    from entrl.models import Transformer

    return Transformer(mcfg, rngs=nnx.Rngs(0), dtype="bfloat16", param_dtype="bfloat16" if spec else "float32",
                       lora=spec)


def test_plan_of_the_paper_model_with_lora_holds_a_fraction_of_the_state():
    """The 1.5B preset's resident state, from shapes alone: LoRA r=16 on every projection keeps AdamW's
    moments at ~1% of full fine-tuning's (18.5M of 1.78B values) and its reference copy at ~2% (float32
    adapters against a bfloat16 copy of the whole model)."""
    cfg = C.load_config(REPO / "configs/paper/r1-distill-qwen-1.5b/sent.yaml", ["mesh.fsdp=1", "mesh.data=-1"])
    mcfg = P.model_config(cfg)
    mesh = make_mesh(data=-1)
    optimizer = S.make_optimizer(lr=1e-5, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0)
    sizes = {}
    for rank in (0, 16):
        spec = lora.LoRASpec(rank, 32.0) if rank else None
        state = nnx.split(nnx.eval_shape(lambda spec=spec: abstract_model(mcfg, spec)))[1]
        params = P._abstract(state, P.param_shardings(state, mesh))
        _, opt_state, ref = P._resident_state(cfg, optimizer, params, mesh)
        sizes[rank] = (P._per_device_bytes(opt_state), P._per_device_bytes(ref))
    assert sizes[16][0] < 0.02 * sizes[0][0]
    assert sizes[16][1] < 0.025 * sizes[0][1]
