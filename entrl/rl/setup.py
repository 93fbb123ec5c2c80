"""Build a training run from a `RunConfig`: mesh, model, tokenizer, data, curriculum, sampler.

Everything here runs on the host before the first compile, so configuration
mistakes (a missing model path, a dataset without the answer column, a mesh
that does not match the devices, a batch that does not split over the data
shards) fail fast with a one-line error saying what to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entrl import config as C
from entrl.sharding import data_shards

log = logging.getLogger("entrl.setup")

DEMO_BUCKETS = (16, 32)


# ---------------------------------------------------------------------------
# Distributed runtime and mesh
# ---------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Join the multi-controller JAX cluster when launched by `launch/` (ENTRL_DISTRIBUTED=1)."""
    if os.environ.get("ENTRL_DISTRIBUTED") != "1" or jax.distributed.is_initialized():
        return
    coord = os.environ.get("ENTRL_COORDINATOR")
    if coord:
        jax.distributed.initialize(coord, int(os.environ["ENTRL_NUM_PROCESSES"]), int(os.environ["ENTRL_PROCESS_ID"]))
    else:  # TPU VMs / SLURM: JAX discovers the cluster itself
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def build_mesh(cfg: C.RunConfig):
    from entrl.sharding import make_mesh

    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise C.ConfigError(str(e) if str(e).startswith("mesh") else f"mesh: {e}") from e
    check_batch_layout(cfg, data_shards(mesh), jax.process_count())
    return mesh


def check_batch_layout(cfg: C.RunConfig, shards: int, processes: int = 1) -> None:
    """ConfigError unless the step's batches split evenly over `shards` data shards and the processes."""
    t, n = cfg.train, cfg.rollout.n
    if t.prompts_per_step % processes:
        raise C.ConfigError(f"train.prompts_per_step={t.prompts_per_step} is not divisible by the "
                            f"{processes} processes")
    prompts_per_call = (cfg.rollout.slots // n) if cfg.rollout.slots else t.prompts_per_step
    if prompts_per_call % shards:  # each sampler call splits its prompts over the data shards
        what = (f"rollout.slots={cfg.rollout.slots} ({prompts_per_call} prompts per sampler call)"
                if cfg.rollout.slots else f"train.prompts_per_step={t.prompts_per_step}")
        raise C.ConfigError(f"{what} must be divisible by the {shards} data shards (mesh.data * mesh.fsdp); "
                            "change it or the mesh (e.g. more mesh.tensor)")
    rows = t.minibatch_prompts * n
    if rows % shards or rows % (shards * C.microbatch_per_shard(cfg, shards)):
        raise C.ConfigError(
            f"a mini-batch of {rows} sequences (train.minibatch_prompts * rollout.n) must split into the {shards} "
            f"data shards (mesh.data * mesh.fsdp) x train.microbatch_per_shard={t.microbatch_per_shard}; change "
            "train.microbatch_per_shard or the mesh")


# ---------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------


def resolve_model_dir(path: str) -> Path:
    """A local HF checkpoint dir, an entrl run dir (its exported policy), or a hub id (downloaded)."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").exists():
            return p
        if (p / "policy" / "config.json").exists():  # entrl run dir after `export` / end of training
            return p / "policy"
        raise C.ConfigError(f"model.path={path!r} is a directory without config.json (not an HF checkpoint "
                            "nor an entrl run directory)")
    if p.suffix or path.startswith((".", "/")) or path.count("/") != 1:
        raise C.ConfigError(f"model.path={path!r} does not exist (give an HF checkpoint dir, an entrl run dir, "
                            "a hub id like Qwen/Qwen3-14B, or 'demo')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def demo_model_config(vocab_size: int, cfg: C.RunConfig, eos_id: int, pad_id: int, bos_id: int | None):
    from entrl.models import ModelConfig

    m = cfg.model
    heads = m.demo_heads
    return ModelConfig(arch="qwen2", vocab_size=vocab_size, hidden_size=m.demo_hidden,
                       intermediate_size=m.demo_hidden * 3, num_layers=m.demo_layers, num_heads=heads,
                       num_kv_heads=max(heads // 2, 1), head_dim=m.demo_hidden // heads, rope_theta=10000.0,
                       rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
                       qk_norm=False, max_position_embeddings=512, bos_token_id=bos_id if bos_id is not None else eos_id,
                       eos_token_id=eos_id, pad_token_id=pad_id)


def build_tokenizer(cfg: C.RunConfig):
    from entrl.tokenizer import load_tokenizer

    name = cfg.model.tokenizer or ("char" if cfg.model.path == "demo" else str(resolve_model_dir(cfg.model.path)))
    if name != "char" and Path(name).is_dir() and (Path(name) / "char_tokenizer.json").exists():
        from entrl.tokenizer import CharTokenizer

        return CharTokenizer.load(name)
    return load_tokenizer(name)


def build_model(cfg: C.RunConfig, mesh, tokenizer):
    """(graphdef, params) of the policy, placed on `mesh`."""
    from entrl.models import create_model, load_pretrained

    m = cfg.model
    if m.path == "demo":
        # Exactly the tokenizer's vocabulary: padding it would let the sampler emit ids no tokenizer decodes.
        mcfg = demo_model_config(tokenizer.vocab_size, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
        model = create_model(mcfg, seed=cfg.train.seed, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                             remat=m.remat)
    else:
        model = load_pretrained(resolve_model_dir(m.path), dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                remat=m.remat)
    graphdef, params = nnx.split(model)
    return graphdef, params


# ---------------------------------------------------------------------------
# Data and curriculum
# ---------------------------------------------------------------------------


def arithmetic_task(cfg: C.RunConfig):
    from entrl.data.tasks import ArithmeticTask

    return ArithmeticTask(max_operands=cfg.data.arithmetic_max_operands, max_number=cfg.data.arithmetic_max_number)


def build_records(cfg: C.RunConfig):
    """(train records, held-out records or None) of the configured task."""
    from entrl.data.sources import load_records

    d = cfg.data
    if d.task == "arithmetic":
        task = arithmetic_task(cfg)
        train = task.make_problems(d.arithmetic_train_size, seed=cfg.train.seed, split="train")
        held = task.make_problems(d.arithmetic_heldout_size, seed=cfg.train.seed, split="heldout")
        return train, held
    if not d.train:
        raise C.ConfigError("data.train is empty: give a JSONL/Parquet path or a hub id")
    try:
        res = load_records(d.train, split=d.split, id_key=d.id_key, problem_key=d.problem_key,
                           answer_key=d.answer_key, on_bad_row=d.on_bad_row, max_rows=d.max_rows)
    except FileNotFoundError as e:
        raise C.ConfigError(f"data.train={d.train!r}: {e}") from e
    except (KeyError, ValueError) as e:
        raise C.ConfigError(f"data.train={d.train!r}: {e}") from e
    if res.skipped:
        log.warning("skipped %d bad rows of %s", res.skipped, d.train)
    return list(res.records), None


def tokenize(cfg: C.RunConfig, records, tokenizer):
    from entrl.data.tasks import tokenize_prompts

    d = cfg.data
    suffix = "" if d.task == "arithmetic" else d.prompt_suffix
    max_len = min(d.max_prompt_len, max(cfg.rollout.prompt_buckets))
    try:
        tokens, kept, dropped = tokenize_prompts(records, tokenizer, max_prompt_len=max_len,
                                                 on_long_prompt=d.on_long_prompt, suffix=suffix,
                                                 chat_template=d.chat_template)
    except ValueError as e:  # a prompt the settings cannot take (too long, chat prompt without a template, ...)
        raise C.ConfigError(str(e)) from None
    if dropped:
        log.warning("dropped %d prompts longer than %d tokens", dropped, max_len)
    if not kept:
        raise C.ConfigError("no training prompt is left after dropping long prompts; raise data.max_prompt_len")
    return tokens, kept


def build_curriculum(cfg: C.RunConfig, records, se_values=None):
    from entrl.data.curriculum import Curriculum

    cur = cfg.curriculum
    if not cur.enabled:
        return Curriculum.uniform(len(records), cur.epochs_per_stage, cur.seed)
    if se_values is None:
        col = cur.se_column
        missing = [r.id for r in records if col not in r.extra]
        if missing:
            raise C.ConfigError(f"curriculum.enabled but {len(missing)} records lack the {col!r} column "
                                f"(e.g. {missing[0]!r}); run `entrl semantic-entropy` or set curriculum.annotate=true")
        se_values = [float(r.extra[col]) for r in records]
    pass_rate = None
    if cur.drop_trivial:
        pass_rate = np.array([float(r.extra.get("pass_rate", 0.5)) for r in records])
    return Curriculum(np.asarray(se_values, np.float64), stages=cur.stages, thresholds=tuple(cur.thresholds),
                      epochs_per_stage=cur.epochs_per_stage, mode=cur.mode, seed=cur.seed,
                      pass_rate=pass_rate, drop_trivial=cur.drop_trivial)


def cache_dtype(cfg: C.RunConfig, setting: str) -> str:
    """A KV-cache dtype setting resolved: "auto" is the compute dtype."""
    return cfg.model.dtype if setting == "auto" else setting


def reference_params(cfg: C.RunConfig, params):
    """The frozen reference policy: a copy of the initial params in the compute dtype (bf16 under bf16
    compute: half the bytes of float32 masters, and the same values the policy's forward computes with)."""
    if cfg.loss.kl_coef == 0:
        return None
    dtype = jnp.dtype(cfg.model.dtype)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x.copy(), p))(params)


def build_sampler(cfg: C.RunConfig, tokenizer, mesh, *, n: int | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None):
    """The rollout sampler (PAD and BOS banned from responses; stop on EOS / end-of-turn ids)."""
    from entrl.sampling import Sampler, SamplingConfig

    r = cfg.rollout
    banned = {tokenizer.pad_token_id} | ({tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else set())
    sc = SamplingConfig(n=n or r.n, temperature=r.temperature if temperature is None else temperature,
                        top_p=top_p or r.top_p, top_k=r.top_k, max_new_tokens=max_new_tokens or r.max_new_tokens,
                        eos_ids=tuple(tokenizer.stop_token_ids), pad_id=tokenizer.pad_token_id,
                        banned_ids=tuple(sorted(banned)), cache_dtype=cache_dtype(cfg, r.cache_dtype))
    return Sampler(sc, mesh=mesh)


def build_verifier(cfg: C.RunConfig):
    from entrl.rewards import Verifier

    rw = cfg.reward
    return Verifier(workers=rw.workers, timeout_s=rw.timeout_s, correct=rw.correct, incorrect=rw.incorrect)


def setup(cfg: C.RunConfig, *, se_values=None, verifier=None):
    """Everything a `Trainer` needs, validated before any compile."""
    from entrl.data.pipeline import PromptPipeline
    from entrl.rl.trainer import Components

    maybe_initialize_distributed()
    mesh = build_mesh(cfg)
    tokenizer = build_tokenizer(cfg)
    records, heldout = build_records(cfg)
    prompt_tokens, records = tokenize(cfg, records, tokenizer)
    graphdef, params = build_model(cfg, mesh, tokenizer)
    ref_params = reference_params(cfg, params)
    sampler = build_sampler(cfg, tokenizer, mesh)
    verifier = verifier or build_verifier(cfg)
    if cfg.curriculum.enabled and se_values is None and any(cfg.curriculum.se_column not in r.extra for r in records):
        if not cfg.curriculum.annotate:
            build_curriculum(cfg, records)  # raises the missing-column error
        from entrl.semantic_entropy import annotate_prompts

        stats = annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, verifier=verifier,
                                 out_path=Path(cfg.train.out_dir) / "semantic_entropy.jsonl", mesh=mesh)
        se_values = [s["se"] for s in stats]
        records = [dataclasses.replace(r, extra={**r.extra, **s}) for r, s in zip(records, stats)]
    curriculum = build_curriculum(cfg, records, se_values)
    per_process = cfg.train.prompts_per_step // jax.process_count()
    pipeline = PromptPipeline(prompt_tokens, curriculum, batch_size=per_process, pad_id=tokenizer.pad_token_id,
                              buckets=tuple(cfg.rollout.prompt_buckets), process_index=jax.process_index(),
                              process_count=jax.process_count())
    held = None
    if heldout is not None:
        held_tokens, held_records = tokenize(cfg, heldout, tokenizer)
        held = (held_tokens, held_records)
    return Components(cfg=cfg, mesh=mesh, graphdef=graphdef, params=params, ref_params=ref_params,
                      tokenizer=tokenizer, records=records, prompt_tokens=prompt_tokens, curriculum=curriculum,
                      pipeline=pipeline, sampler=sampler, verifier=verifier, heldout=held)


def save_policy(graphdef, params, tokenizer, out_dir: str | Path) -> Path:
    """Write the policy as an HF checkpoint (plus its tokenizer) to `out_dir`."""
    from entrl.models import save_pretrained

    out = Path(out_dir)
    model = nnx.merge(graphdef, params)
    if jax.process_index() == 0:
        save_pretrained(model, out)
        tokenizer.save(out)
    return out


def train_from_config(cfg: C.RunConfig, *, resume: bool = True, max_steps: int | None = None):
    """Set up, train, write the final policy to `<out_dir>/policy`; returns the Trainer (closed)."""
    from entrl.rl.trainer import Trainer

    comps = setup(cfg)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=2))
    trainer = Trainer(comps)
    try:
        trainer.run(max_steps=max_steps, resume=resume)
        save_policy(comps.graphdef, trainer.params, comps.tokenizer, out / "policy")
    finally:
        trainer.close()
        comps.verifier.close()
    return trainer


def export_run(run_dir: str, out_dir: str) -> Path:
    """`entrl export`: the latest checkpoint of a run as an HF checkpoint directory."""
    from entrl.checkpoint import CheckpointManager
    from entrl.rl.trainer import Trainer  # noqa: F401  (keeps import graph uniform)

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise C.ConfigError(f"{run_dir!r} is not an entrl run directory (no config.json)")
    cfg = C.from_dict(json.loads(cfg_path.read_text()))
    tokenizer = build_tokenizer(cfg)
    # Params FSDP-sharded over whatever devices this machine has: the run's batch layout (build_mesh's
    # checks) is irrelevant to an export, which may run on a different machine than the training.
    from entrl.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    graphdef, params = build_model(cfg, mesh, tokenizer)
    ckpt = CheckpointManager(run / "checkpoints")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    restored = ckpt.restore_latest(params_target=abstract, opt_state_target=None)
    if restored is None:
        raise C.ConfigError(f"{run_dir!r} has no restorable checkpoint")
    out = save_policy(graphdef, restored.params, tokenizer, out_dir)
    ckpt.close()
    log.info("exported step %d of %s to %s", restored.step, run_dir, out)
    return out
