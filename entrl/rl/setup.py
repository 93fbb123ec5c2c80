"""Build a training run from a `RunConfig`: mesh, model, tokenizer, data, curriculum, sampler.

Everything here runs on the host before the first compile, so configuration
mistakes (a missing model path, a dataset without the answer column, a mesh
that does not match the devices, a batch that does not split over the data
shards) fail fast with a one-line error saying what to change.

The run directory (`entrl.rundir`) is checked and locked before anything is
written to it, and the final `policy/` is written only when the run finished
(a SIGTERM leaves a checkpoint and raises `Preempted`). Writing an HF policy
is a collective: every process joins the parameter gather, process 0 writes.
"""

from __future__ import annotations

import contextlib
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
from entrl import rundir as R
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
    if t.prompts_per_step % shards:  # the sampler splits the step's prompts over the data shards
        raise C.ConfigError(f"train.prompts_per_step={t.prompts_per_step} must be divisible by the {shards} data "
                            "shards (mesh.data * mesh.fsdp); change it or the mesh (e.g. more mesh.tensor)")
    if 0 < cfg.rollout.slots < t.prompts_per_step * n and cfg.rollout.slots % shards:
        raise C.ConfigError(f"rollout.slots={cfg.rollout.slots} must be a multiple of the {shards} data shards "
                            "(mesh.data * mesh.fsdp): each shard decodes its own prompts in its own slots")
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
    """A local HF checkpoint dir, an entrl run dir's `policy/`, or a hub id (downloaded).

    A run directory without `policy/` has no HF checkpoint: `build_model` restores its latest
    checkpoint instead (`run_checkpoint_source`); here it is an error saying how to export one.
    """
    p = Path(path)
    if p.is_dir():
        if R.is_run_dir(p):  # before config.json: an old run dir's config.json is the run's, not a model's
            if (p / "policy" / "config.json").exists():
                return p / "policy"
            raise C.ConfigError(f"model.path={path!r} is an entrl run directory without policy/ (the run did not "
                                f"finish); write one with `entrl export {path} --out DIR` and use DIR")
        if (p / "config.json").exists():
            return p
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


@dataclasses.dataclass(frozen=True)
class RunSource:
    """`model.path` naming an entrl run directory without `policy/`: the policy is its checkpoint."""

    path: R.Path
    cfg: C.RunConfig  # the run's own config (its model.path is the model it started from)


def run_checkpoint_source(path: str) -> RunSource | None:
    """The run behind `path` when it is a run directory without `policy/`, else None."""
    if path == "demo" or (not R.is_remote(path) and not Path(path).is_dir()):
        return None
    p = R.absolute(R.as_path(path, "model.path"))
    stored = R.read_run_config(p)
    if stored is None or (p / "policy" / "config.json").exists():
        return None
    run_cfg = C.from_dict(stored)
    if R.is_run_dir(run_cfg.model.path) and R.absolute(R.as_path(run_cfg.model.path)) == p:
        raise C.ConfigError(f"model.path={path!r}: the run names itself as its model")
    return RunSource(p, run_cfg)


def _as_run_model(cfg: C.RunConfig, run: RunSource) -> C.RunConfig:
    """`cfg` with the model identity (path, demo shape, tokenizer) of the run's own model."""
    m = run.cfg.model
    tok = cfg.model.tokenizer or m.tokenizer or ("char" if m.path == "demo" else "")
    return C.replace(cfg, **{"model.path": m.path, "model.tokenizer": tok, "model.demo_hidden": m.demo_hidden,
                             "model.demo_layers": m.demo_layers, "model.demo_heads": m.demo_heads})


def restore_run_params(run: RunSource, graphdef_params, *, step: int | None = None):
    """Params of `run`'s checkpoint (latest, or `step`) restored onto the layout of `graphdef_params`.

    A checkpoint holds the trained params (`entrl.models.lora.trainable`): under LoRA only the adapters,
    restored into `graphdef_params`' base.
    """
    from entrl.checkpoint import CheckpointManager
    from entrl.models import lora

    _, params = graphdef_params
    stored, frozen = lora.split(params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), stored)
    mgr = CheckpointManager(run.path / "checkpoints", read_only=True)  # never renames anything in the run
    try:
        restored = mgr.restore_latest(params_target=abstract, step=step)
    except ValueError as e:
        raise C.ConfigError(str(e)) from None
    finally:
        mgr.close()
    if restored is None:
        raise C.ConfigError(f"{str(run.path)!r} has no restorable checkpoint")
    return dataclasses.replace(restored, params=lora.join(restored.params, frozen))


def build_tokenizer(cfg: C.RunConfig):
    from entrl.tokenizer import load_tokenizer

    run = run_checkpoint_source(cfg.model.path)
    if run is not None:
        return build_tokenizer(_as_run_model(cfg, run))
    name = cfg.model.tokenizer or ("char" if cfg.model.path == "demo" else str(resolve_model_dir(cfg.model.path)))
    if name != "char" and Path(name).is_dir() and (Path(name) / "char_tokenizer.json").exists():
        from entrl.tokenizer import CharTokenizer

        return CharTokenizer.load(name)
    return load_tokenizer(name)


def check_context_length(cfg: C.RunConfig, max_position_embeddings: int) -> None:
    """ConfigError when the longest sequence the sampler can build exceeds the model's context.

    That sequence is the largest prompt bucket plus `rollout.max_new_tokens` (the KV cache is
    allocated for it); checked from the model's config.json, before weights are read or anything
    is compiled (a 100,000-token setting otherwise compiles for minutes and then asks for ~1 TB).
    """
    bucket, new = max(cfg.rollout.prompt_buckets), cfg.rollout.max_new_tokens
    if bucket + new > max_position_embeddings:
        raise C.ConfigError(
            f"rollout.max_new_tokens={new} + the largest rollout.prompt_buckets entry {bucket} = {bucket + new} "
            f"tokens exceeds the model's context of {max_position_embeddings} tokens (max_position_embeddings of "
            f"{cfg.model.path!r}); lower rollout.max_new_tokens or rollout.prompt_buckets")


def build_model(cfg: C.RunConfig, mesh, tokenizer):
    """(graphdef, params) of the policy, placed on `mesh` (after `check_context_length`)."""
    from entrl.models import ModelConfig, create_model, load_pretrained

    run = run_checkpoint_source(cfg.model.path)
    if run is not None:  # an unfinished run: its model, with the params of its latest checkpoint
        from entrl.models.lora import merge_adapters

        m = run.cfg.model  # built as that run was (with its adapters), then its adapters merged in
        as_run = C.replace(_as_run_model(cfg, run), **{"model.lora_rank": m.lora_rank, "model.lora_alpha": m.lora_alpha,
                                                       "model.lora_targets": list(m.lora_targets)})
        graphdef, params = build_policy(as_run, mesh, tokenizer)
        params = restore_run_params(run, (graphdef, params)).params
        graphdef, params = nnx.split(merge_adapters(nnx.merge(graphdef, params)))
        want = jnp.dtype(cfg.model.param_dtype)  # a LoRA run's base is in its compute dtype
        return graphdef, jax.tree.map(lambda x: x.astype(want) if x.dtype != want else x, params)
    m = cfg.model
    if m.path == "demo":
        # Exactly the tokenizer's vocabulary: padding it would let the sampler emit ids no tokenizer decodes.
        mcfg = demo_model_config(tokenizer.vocab_size, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
        check_context_length(cfg, mcfg.max_position_embeddings)
        model = create_model(mcfg, seed=cfg.train.seed, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                             remat=m.remat)
    else:
        model_dir = resolve_model_dir(m.path)
        check_context_length(cfg, ModelConfig.from_pretrained(model_dir).max_position_embeddings)
        model = load_pretrained(model_dir, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                remat=m.remat)
    graphdef, params = nnx.split(model)
    return graphdef, params


def lora_spec(cfg: C.RunConfig):
    """The run's `entrl.models.lora.LoRASpec` (adapters in `model.param_dtype`: they are the trained
    weights), or None when `model.lora_rank` is 0."""
    from entrl.models.lora import LoRASpec

    m = cfg.model
    return LoRASpec(m.lora_rank, m.lora_alpha, tuple(m.lora_targets), m.param_dtype) if m.lora_rank else None


def base_param_dtype(cfg: C.RunConfig) -> str:
    """The storage dtype of the model's own weights: `model.param_dtype`, or under LoRA (where they are
    frozen, and every use casts them to it) the compute dtype `model.dtype`: half the bytes in bfloat16."""
    return cfg.model.dtype if cfg.model.lora_rank else cfg.model.param_dtype


def build_policy(cfg: C.RunConfig, mesh, tokenizer):
    """(graphdef, params) of the policy to train: `build_model`'s, or under LoRA the base in the compute
    dtype (`base_param_dtype`) with fresh adapters (B = 0, so the same function) sharing its arrays."""
    from entrl.models.lora import add_adapters

    spec = lora_spec(cfg)
    if spec is None:
        return build_model(cfg, mesh, tokenizer)
    base = C.replace(cfg, **{"model.param_dtype": base_param_dtype(cfg)})
    graphdef, params = build_model(base, mesh, tokenizer)
    return nnx.split(add_adapters(nnx.merge(graphdef, params), spec, seed=cfg.train.seed, mesh=mesh))


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
        seed = d.arithmetic_seed if d.arithmetic_seed >= 0 else cfg.train.seed
        train = task.make_problems(d.arithmetic_train_size, seed=seed, split="train")
        held = task.make_problems(d.arithmetic_heldout_size, seed=seed, split="heldout")
        return train, held
    if not d.train:
        raise C.ConfigError("data.train is empty: give a JSONL/Parquet path or a hub id")
    try:
        res = load_records(d.train, split=d.split, id_key=d.id_key, problem_key=d.problem_key,
                           answer_key=d.answer_key, on_bad_row=d.on_bad_row, max_rows=d.max_rows)
    except FileNotFoundError as e:
        raise C.ConfigError(f"data.train={d.train!r}: {e}") from e
    except (KeyError, ValueError, ImportError) as e:  # ImportError: a gs:// path without gcsfs installed
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
    if se_values is None and not needs_semantic_entropy(cfg):  # order=random: stages ignore SE
        se_values = np.zeros(len(records))
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
                      epochs_per_stage=cur.epochs_per_stage, mode=cur.mode, order=cur.order, seed=cur.seed,
                      pass_rate=pass_rate, drop_trivial=cur.drop_trivial)


def needs_semantic_entropy(cfg: C.RunConfig) -> bool:
    """Whether the curriculum reads per-prompt SE (or the annotation's pass rates, for drop_trivial)."""
    cur = cfg.curriculum
    return cur.enabled and (cur.order != "random" or cur.drop_trivial)


def build_val_set(cfg: C.RunConfig, tokenizer, heldout_records=None):
    """(prompt tokens, records) that `train.eval_every` evaluates, or None when it is off.

    `val.data` names a benchmark (`entrl.benchmarks.BENCHMARKS`, read from `eval.data_dir` or the hub) or
    a JSONL/Parquet file; empty, it is the task's held-out split (`heldout_records`). `val.max_problems`
    keeps the first N.
    """
    v = cfg.val
    if not cfg.train.eval_every:
        return None
    if v.data:
        from entrl.benchmarks import load_benchmark

        try:
            records = load_benchmark(v.data, data_dir=cfg.eval.data_dir or None, max_problems=v.max_problems).records
        except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
            raise C.ConfigError(f"val.data={v.data!r}: {e}") from None
    else:
        if heldout_records is None:  # RunConfig refuses this combination; a hand-built config may not
            raise C.ConfigError("train.eval_every needs val.data (this task has no held-out split)")
        records = list(heldout_records[:v.max_problems] if v.max_problems else heldout_records)
    if not records:
        raise C.ConfigError(f"val.data={v.data!r} holds no problems")
    return tokenize(cfg, records, tokenizer)


def cache_dtype(cfg: C.RunConfig, setting: str) -> str:
    """A KV-cache dtype setting resolved: "auto" is the compute dtype."""
    return cfg.model.dtype if setting == "auto" else setting


def reference_params(cfg: C.RunConfig, params):
    """The frozen reference policy: a copy of the initial params in the compute dtype (bf16 under bf16
    compute: half the bytes of float32 masters, and the same values the policy's forward computes with).

    Under LoRA only the adapters are copied and the base's arrays are shared (the update never donates
    them): at the start the adapters are B = 0, so this is the base with its adapters disabled.
    """
    from entrl.models import lora

    if cfg.loss.kl_coef == 0:
        return None
    if lora.has_adapters(params):
        adapters, base = lora.split(params)
        return lora.join(jax.jit(lambda a: jax.tree.map(jnp.copy, a))(adapters), base)
    dtype = jnp.dtype(cfg.model.dtype)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x.copy(), p))(params)


def build_sampler(cfg: C.RunConfig, tokenizer, mesh, *, n: int | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, slots: int = 0):
    """A sampler with the run's rollout settings (PAD and BOS banned from responses; stop on EOS / end-of-turn
    ids). `slots`: continuous batching (`entrl.sampling`); the training rollout passes `rollout.slots`, the
    evaluation and annotation samplers (other batch shapes) decode every row at once."""
    from entrl.sampling import Sampler, SamplingConfig

    r = cfg.rollout
    banned = {tokenizer.pad_token_id} | ({tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else set())
    sc = SamplingConfig(n=n or r.n, temperature=r.temperature if temperature is None else temperature,
                        top_p=top_p or r.top_p, top_k=r.top_k, max_new_tokens=max_new_tokens or r.max_new_tokens,
                        eos_ids=tuple(tokenizer.stop_token_ids), pad_id=tokenizer.pad_token_id,
                        banned_ids=tuple(sorted(banned)), cache_dtype=cache_dtype(cfg, r.cache_dtype), slots=slots)
    return Sampler(sc, mesh=mesh)


def reward_terms(cfg: C.RunConfig):
    """The `reward.fn` terms with their `reward.weights`, each imported now (`entrl.rewards.reward_fns`):
    a ConfigError in one line when one does not import, lacks the attribute or is not callable."""
    from entrl.rewards import reward_fns

    try:
        return reward_fns(cfg.reward.fn, cfg.reward.weights)
    except ValueError as e:
        raise C.ConfigError(f"reward.fn: {e}") from None


def build_verifier(cfg: C.RunConfig, *, math_only: bool = False):
    """The reward's `Verifier` with the `reward.fn` terms (`reward_terms`; `math_only`: the math grading
    alone, for annotation and evaluation, which never call the other terms); its worker processes start
    on first use."""
    from entrl.rewards import Verifier

    rw = cfg.reward
    extra = {} if math_only else {"rewards": reward_terms(cfg)}
    return Verifier(workers=rw.workers, timeout_s=rw.timeout_s, correct=rw.correct, incorrect=rw.incorrect, **extra)


def setup(cfg: C.RunConfig, *, se_values=None, verifier=None):
    """Everything a `Trainer` needs, validated before any compile."""
    from entrl.data.pipeline import PromptPipeline
    from entrl.rl.trainer import Components

    maybe_initialize_distributed()
    mesh = build_mesh(cfg)
    verifier = verifier or build_verifier(cfg)  # imports the reward functions: before anything compiles
    tokenizer = build_tokenizer(cfg)
    records, heldout = build_records(cfg)
    prompt_tokens, records = tokenize(cfg, records, tokenizer)
    graphdef, params = build_policy(cfg, mesh, tokenizer)
    ref_params = reference_params(cfg, params)
    sampler = build_sampler(cfg, tokenizer, mesh, slots=cfg.rollout.slots)
    if needs_semantic_entropy(cfg) and se_values is None and any(cfg.curriculum.se_column not in r.extra
                                                                  for r in records):
        if not cfg.curriculum.annotate:
            build_curriculum(cfg, records)  # raises the missing-column error
        from entrl.semantic_entropy import annotate_prompts

        out_path = R.as_path(cfg.train.out_dir, "train.out_dir") / "semantic_entropy.jsonl"
        # Batches of a rollout call's prompts: with curriculum.samples == rollout.n (the paper's 8 and 8) the
        # annotation runs the rollout's own sampler program (one compile, and the memory the plan checked).
        per_call = cfg.rollout.slots // cfg.rollout.n if cfg.rollout.slots else cfg.train.prompts_per_step
        stats = annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, verifier=verifier,
                                 out_path=out_path, mesh=mesh, batch_prompts=per_call)
        se_values = [s["se"] for s in stats]
        records = [dataclasses.replace(r, extra={**r.extra, **s}) for r, s in zip(records, stats)]
    curriculum = build_curriculum(cfg, records, se_values)
    per_process = cfg.train.prompts_per_step // jax.process_count()
    pipeline = PromptPipeline(prompt_tokens, curriculum, batch_size=per_process, pad_id=tokenizer.pad_token_id,
                              buckets=tuple(cfg.rollout.prompt_buckets), process_index=jax.process_index(),
                              process_count=jax.process_count())
    held = build_val_set(cfg, tokenizer, heldout)
    return Components(cfg=cfg, mesh=mesh, graphdef=graphdef, params=params, ref_params=ref_params,
                      tokenizer=tokenizer, records=records, prompt_tokens=prompt_tokens, curriculum=curriculum,
                      pipeline=pipeline, sampler=sampler, verifier=verifier, heldout=held)


def save_policy(graphdef, params, tokenizer, out_dir, *, dtype: str | None = None) -> Path:
    """Write the policy as an HF checkpoint (plus its tokenizer) to `out_dir` (local or gs://).

    Every process must call this: gathering sharded params to the host is a collective.
    Process 0 writes. LoRA adapters are merged into their kernels first (a plain checkpoint);
    `dtype` then casts the floating params (None keeps theirs).
    """
    import jax.numpy as jnp

    from entrl.models import save_pretrained
    from entrl.models.lora import merge_adapters

    out = R.as_path(out_dir, "policy directory")
    model = merge_adapters(nnx.merge(graphdef, params))
    if dtype is not None:
        want = jnp.dtype(dtype)
        graphdef, params = nnx.split(model)
        params = jax.tree.map(lambda x: x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        model = nnx.merge(graphdef, params)
    primary = jax.process_index() == 0
    with R.local_copy_for_upload(out) if primary else contextlib.nullcontext(out) as local:
        save_pretrained(model, Path(os.fspath(local)))  # every process: its gather is a collective
        if primary:
            tokenizer.save(Path(os.fspath(local)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("entrl_save_policy")
    return R.native(out)


def source_dtype(cfg: C.RunConfig) -> str:
    """The dtype the policy's model came in: its HF config's torch_dtype (float32 for the demo model)."""
    run = run_checkpoint_source(cfg.model.path)
    if run is not None:
        return source_dtype(run.cfg)
    if cfg.model.path == "demo":
        return "float32"
    hf = json.loads((resolve_model_dir(cfg.model.path) / "config.json").read_text())
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after writing a checkpoint; rerunning the same command resumes it."""

    def __init__(self, step: int, out_dir):
        super().__init__(f"stopped by SIGTERM after step {step}; its checkpoint is in {out_dir}; "
                         "run the same command again to resume")
        self.step = step


class DoesNotFit(C.ConfigError):
    """The run's memory plan exceeds the devices' memory."""


def check_memory(cfg: C.RunConfig) -> None:
    """With `train.memory_check` on an accelerator that reports its memory, plan the run (`entrl.plan`,
    no weights read) and raise `DoesNotFit` (after logging the plan's table) when it cannot fit."""
    if not cfg.train.memory_check:
        return
    from entrl.plan import device_budget, plan_run

    budget, source = device_budget()
    if budget is None:  # CPU, or a backend without memory stats: nothing to check against
        log.info("memory check skipped (%s)", source)
        return
    plan = plan_run(cfg, budget_bytes=budget, budget_source=source)
    log.info("memory plan:\n%s", plan.table())
    if not plan.fits:
        worst = max((k for k in plan.per_device_bytes if k.endswith("_peak")), key=plan.per_device_bytes.get)
        raise DoesNotFit(f"the run needs {plan.peak_bytes / 2**30:.1f} GiB per device ({worst}) of "
                         f"{budget / 2**30:.1f} GiB ({plan.headroom:.0%} kept free); see the plan above "
                         "(`entrl plan`): model.remat=full, a smaller train.microbatch_per_shard, rollout.slots or "
                         "eval.batch_problems, or more devices (train.memory_check=false skips this check)")


def train_from_config(cfg: C.RunConfig, *, resume: bool = True, overwrite: bool = False,
                      max_steps: int | None = None):
    """Lock the run directory, set up, train, write the final policy to `<out_dir>/policy`.

    Returns the Trainer (closed). `resume=False` in a directory that already holds a run raises
    ConfigError unless `overwrite` (which deletes that run first). Raises `Preempted` when the run
    stopped on SIGTERM (a checkpoint is written, `policy/` is not).
    """
    from entrl.rl.trainer import Trainer

    maybe_initialize_distributed()
    reward_terms(cfg)  # a reward function that does not import fails before the run directory, plan or warm start
    run_dir = R.RunDir.open(cfg.train.out_dir, resume=resume, overwrite=overwrite, config=C.to_dict(cfg))
    try:
        check_memory(cfg)
        if cfg.warmstart.enabled:  # the demo model's noisy-teacher SFT, once per run directory
            from entrl.demo import warm_started

            cfg = warm_started(cfg, run_dir.path / "warmstart")
        comps = setup(cfg)
        trainer = Trainer(comps, run_dir=run_dir)
        try:
            trainer.run(max_steps=max_steps, resume=resume and not overwrite)
            if trainer.preempted:
                raise Preempted(trainer.step, run_dir.path / "checkpoints")
            save_policy(comps.graphdef, trainer.params, comps.tokenizer, run_dir.path / "policy")
        finally:
            trainer.close()
            comps.verifier.close()
    finally:
        run_dir.close()
    return trainer


def export_run(run_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> Path:
    """`entrl export`: a kept checkpoint of a run (latest by default) as an HF checkpoint directory.

    Read-only on the run. `dtype` defaults to the dtype of the run's source model (`source_dtype`).
    Runs under `launch/` too: every process restores and joins the gather, process 0 writes.
    """
    maybe_initialize_distributed()
    run = R.absolute(R.as_path(run_dir, "run directory"))
    stored = R.read_run_config(run)
    if stored is None:
        raise C.ConfigError(f"{run_dir!r} is not an entrl run directory (no {R.RUN_CONFIG})")
    out = R.as_path(out_dir, "--out")
    if out.exists() and any(True for _ in out.iterdir()) and not R.is_model_dir(out):
        raise C.ConfigError(f"--out {out_dir!r} is a non-empty directory that is not a model directory")
    source = RunSource(run, C.from_dict(stored))
    cfg = _as_run_model(source.cfg, source)
    tokenizer = build_tokenizer(cfg)
    # Params FSDP-sharded over whatever devices this machine has: the run's batch layout (build_mesh's
    # checks) is irrelevant to an export, which may run on a different machine than the training.
    from entrl.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    graphdef, params = build_policy(cfg, mesh, tokenizer)  # under LoRA: the base, and the run's adapters restored
    restored = restore_run_params(source, (graphdef, params), step=step)
    dtype = dtype or source_dtype(cfg)
    save_policy(graphdef, restored.params, tokenizer, out, dtype=dtype)
    if jax.process_index() == 0:
        log.info("exported step %d of %s to %s (%s)", restored.step, run_dir, out, dtype)
    return R.native(out)
