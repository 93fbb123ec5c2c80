"""Build a training run from a `RunConfig` (model, task, data, curriculum, sampler, reward: the
`Components` a `Trainer` runs), and the commands made of it: `train_from_config`, `export_run`,
`annotate_dataset`, and the demo model's warm start. The mesh, the model's origin and the tokenizer
come from `entrl.build`; the task, reward and rollout backend are `entrl.seams` Protocols, so a
caller may pass its own (`setup(cfg, task=..., verifier=...)`).

Everything here runs on the host before the first compile, so configuration
mistakes (a missing model path, a dataset without the answer column, a mesh
that does not match the devices, a batch that does not split over the data
shards) fail fast with a one-line error saying what to change. The checks that
need no weights (`prepare_inputs`: tokenizer, data, model config, evaluation set,
curriculum stage sizes, reward) run before the run directory is written and
before the SE annotation; what only the annotation decides is checked after it.

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
import numbers
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from entrl import config as C
from entrl import plan
from entrl import rundir as R
from entrl.annotate import annotate_prompts, plot_se_histogram, read_progress
from entrl.build import (
    RunSource,
    base_param_dtype,
    build_mesh,
    build_tokenizer,
    check_tokenizer_fits,
    demo_model_config,
    lora_spec,
    maybe_initialize_distributed,
    resolve_model_dir,
    run_checkpoint_source,
    run_model_config,
)
from entrl.checkpoint import CheckpointManager
from entrl.data.curriculum import Curriculum
from entrl.data.pipeline import PromptPipeline
from entrl.data.sources import load_records, write_records
from entrl.data.tasks import ArithmeticTask, build_prompt, tokenize_prompts
from entrl.eval_suites import load_benchmark
from entrl.models import CheckpointFilesError, ModelConfig, create_model, load_pretrained, lora, save_pretrained
from entrl.rewards import MATH_REWARD, Verifier, WorkerImportError, reward_fns
from entrl.rl.summary import log_startup_summary
from entrl.rl.trainer import Components, Trainer, reference_params, step_settings
from entrl.sampling import annotation_batch_prompts, build_sampler
from entrl.sft import train_sft
from entrl.sharding import data_shards, make_mesh
from entrl.tokenizer import Tokenizer

log = logging.getLogger("entrl.setup")


# ---------------------------------------------------------------------------
# Model (its origin, the mesh and the tokenizer are `entrl.build`'s)
# ---------------------------------------------------------------------------


def restore_run_params(run: RunSource, graphdef_params, *, step: int | None = None):
    """Params of `run`'s checkpoint (latest, or `step`) restored onto the layout of `graphdef_params`.

    A checkpoint holds the trained params (`entrl.models.lora.trainable`): under LoRA only the adapters,
    restored into `graphdef_params`' base.
    """
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


def check_context_length(cfg: C.RunConfig, max_position_embeddings: int) -> None:
    """ConfigError when the longest sequence the sampler can build exceeds the model's context.

    That sequence is the largest prompt bucket plus `rollout.max_new_tokens` (the KV cache is
    allocated for it); checked from the model's config.json, before weights are read or anything
    is compiled (a 100,000-token setting otherwise compiles for minutes and then asks for ~1 TB).
    """
    bucket = max(cfg.rollout.prompt_buckets)
    budgets = [("rollout.max_new_tokens", cfg.rollout.max_new_tokens)]
    if cfg.train.eval_every and cfg.val.max_new_tokens:  # the periodic evaluation's own budget
        budgets.append(("val.max_new_tokens", cfg.val.max_new_tokens))
    for key, new in budgets:
        if bucket + new > max_position_embeddings:
            raise C.ConfigError(
                f"{key}={new} + the largest rollout.prompt_buckets entry {bucket} = {bucket + new} tokens exceeds "
                f"the model's context of {max_position_embeddings} tokens (max_position_embeddings of "
                f"{cfg.model.path!r}); lower {key} or rollout.prompt_buckets")


def check_model(cfg: C.RunConfig, tokenizer) -> None:
    """ConfigError when the policy's model cannot be built: `model.path` does not resolve, its config.json is not
    a supported model, or its context is too short (`check_context_length`). Reads no weights."""
    run = run_checkpoint_source(cfg.model.path)
    if run is not None:
        return check_model(run_model_config(cfg, run), tokenizer)
    if cfg.model.path == "demo":
        mcfg = demo_model_config(tokenizer.vocab_size, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 tokenizer.bos_token_id)
    else:
        model_dir = resolve_model_dir(cfg.model.path)
        try:
            mcfg = ModelConfig.from_pretrained(model_dir)
        except (KeyError, TypeError, ValueError) as e:  # ValueError: an unsupported model, or config.json not JSON
            raise C.ConfigError(f"model.path={cfg.model.path!r}: {e}") from None
    check_context_length(cfg, mcfg.max_position_embeddings)
    check_tokenizer_fits(cfg, tokenizer, mcfg.vocab_size)


def build_model(cfg: C.RunConfig, mesh, tokenizer):
    """(graphdef, params) of the policy, placed on `mesh` (after `check_context_length`)."""
    run = run_checkpoint_source(cfg.model.path)
    if run is not None:  # an unfinished run: its model, with the params of its latest checkpoint
        m = run.cfg.model  # built as that run was (with its adapters), then its adapters merged in
        as_run = C.replace(run_model_config(cfg, run), **{"model.lora_rank": m.lora_rank, "model.lora_alpha": m.lora_alpha,
                                                          "model.lora_targets": list(m.lora_targets)})
        graphdef, params = build_policy(as_run, mesh, tokenizer)
        params = restore_run_params(run, (graphdef, params)).params
        graphdef, params = nnx.split(lora.merge_adapters(nnx.merge(graphdef, params)))
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
        try:
            model = load_pretrained(model_dir, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat)
        except CheckpointFilesError as e:
            raise C.ConfigError(f"model.path={m.path!r}: {e}") from None
    graphdef, params = nnx.split(model)
    return graphdef, params


def build_policy(cfg: C.RunConfig, mesh, tokenizer):
    """(graphdef, params) of the policy to train: `build_model`'s, or under LoRA the base in the compute
    dtype (`entrl.build.base_param_dtype`) with fresh adapters (B = 0, so the same function) sharing its arrays."""
    spec = lora_spec(cfg)
    if spec is None:
        return build_model(cfg, mesh, tokenizer)
    base = C.replace(cfg, **{"model.param_dtype": base_param_dtype(cfg)})
    graphdef, params = build_model(base, mesh, tokenizer)
    return nnx.split(lora.add_adapters(nnx.merge(graphdef, params), spec, seed=cfg.train.seed, mesh=mesh))


# ---------------------------------------------------------------------------
# Data and curriculum
# ---------------------------------------------------------------------------


def arithmetic_task(cfg: C.RunConfig):
    return ArithmeticTask(max_operands=cfg.data.arithmetic_max_operands, max_number=cfg.data.arithmetic_max_number)


def build_records(cfg: C.RunConfig):
    """(train records, held-out records or None) of the configured task."""
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


@dataclasses.dataclass(frozen=True)
class ConfiguredTask:
    """The built-in tasks (`entrl.seams.Task`) of `data.task`: `math` reads `data.train` (JSONL/Parquet/hub,
    with `data.*_key` columns) and appends `data.prompt_suffix`; `arithmetic` draws the demo's synthetic
    problems (with a held-out split) and appends nothing. Both are graded by the `Verifier` of `reward.*`."""

    cfg: C.RunConfig

    @property
    def instruction(self) -> str:
        return "" if self.cfg.data.task == "arithmetic" else self.cfg.data.prompt_suffix

    def records(self):
        return build_records(self.cfg)

    def reward(self):
        return build_verifier(self.cfg)


def tokenize(cfg: C.RunConfig, records, tokenizer, *, instruction: str | None = None):
    """(prompt token lists, the records kept) of `records`; `instruction` is appended to plain-text problems
    (None = the configured task's)."""
    d = cfg.data
    suffix = ConfiguredTask(cfg).instruction if instruction is None else instruction
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
        limit = ("data.max_prompt_len" if d.max_prompt_len <= max(cfg.rollout.prompt_buckets)
                 else "the largest rollout.prompt_buckets entry")
        raise C.ConfigError(f"no training prompt is left after dropping those longer than {max_len} tokens; raise "
                            f"{limit}")
    return tokens, kept


def _column_numbers(records, col: str, what: str) -> list[float]:
    """The records' `col` values as floats; ConfigError naming the first record whose value is not a number
    (null, text, a list, true/false)."""
    out = []
    for r in records:
        v = r.extra[col]
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise C.ConfigError(f"record {r.id!r}: {what} holds {json.dumps(v)[:40]}, not a number; fix the data or "
                                "drop the column to annotate again (curriculum.annotate=true)")
        out.append(float(v))
    return out


def build_curriculum(cfg: C.RunConfig, records, se_values=None):
    cur = cfg.curriculum
    if not cur.enabled:
        return Curriculum.uniform(len(records), cur.epochs_per_stage, cur.seed)
    if se_values is None and not C.needs_semantic_entropy(cfg):  # order=random: stages ignore SE
        se_values = np.zeros(len(records))
    if se_values is None:
        col = cur.se_column
        missing = [r.id for r in records if col not in r.extra]
        if missing:
            raise C.ConfigError(f"curriculum.enabled but {len(missing)} records lack the {col!r} column "
                                f"(e.g. {missing[0]!r}); run `entrl semantic-entropy` or set curriculum.annotate=true")
        se_values = _column_numbers(records, col, f"the curriculum's SE column (curriculum.se_column={col!r})")
    pass_rate = None
    if cur.drop_trivial:
        missing = [r.id for r in records if "pass_rate" not in r.extra]
        if missing:  # 0.5 would keep them silently: say which data lacks it and how to get it
            raise C.ConfigError(f"curriculum.drop_trivial needs each prompt's pass_rate (written with the SE by "
                                f"`entrl semantic-entropy`); {len(missing)} records lack it (e.g. {missing[0]!r})")
        pass_rate = np.array(_column_numbers(records, "pass_rate", "curriculum.drop_trivial's pass_rate column"))
    try:
        return Curriculum(np.asarray(se_values, np.float64), stages=cur.stages, thresholds=tuple(cur.thresholds),
                          epochs_per_stage=cur.epochs_per_stage, mode=cur.mode, order=cur.order, seed=cur.seed,
                          pass_rate=pass_rate, drop_trivial=cur.drop_trivial)
    except ValueError as e:  # stages the prompts cannot fill, an empty threshold stage, non-finite SE values
        key = ("curriculum.thresholds" if "threshold" in str(e) else "curriculum.drop_trivial"
               if "drop_trivial" in str(e) else "curriculum")
        raise C.ConfigError(f"{key}: {e}") from None


def stage_sizes(cfg: C.RunConfig, prompts: int) -> list[int] | None:
    """The prompts of each curriculum stage when `prompts` usable prompts alone decide them (one stage, or
    curriculum.stages equal-count stages); None when SE values do (curriculum.thresholds, drop_trivial)."""
    cur = cfg.curriculum
    if not cur.enabled or (cur.mode == "continuous" and not cur.drop_trivial):
        return [prompts]
    if cur.drop_trivial or cur.thresholds:
        return None
    return [len(a) for a in np.array_split(np.arange(prompts), cur.stages)]


def check_stage_sizes(cfg: C.RunConfig, prompts: int, curriculum: Curriculum | None = None) -> None:
    """ConfigError unless every curriculum stage holds one step's prompts (train.prompts_per_step) or more.

    Without `curriculum`, from the count of usable prompts: exactly where it decides the stage sizes
    (`stage_sizes`), else (SE thresholds, drop_trivial: sized by the annotation) only whether the prompts
    could fill the stages; `setup` checks the built curriculum again after the annotation.
    """
    cur, per_step = cfg.curriculum, cfg.train.prompts_per_step
    more = "raise data.arithmetic_train_size" if cfg.data.task == "arithmetic" else "train on more prompts"
    fewer = "choose other curriculum.thresholds" if cur.thresholds else "lower curriculum.stages"
    kind = "prompts curriculum.drop_trivial kept" if curriculum is not None and cur.drop_trivial else "usable prompts"
    sizes = stage_sizes(cfg, prompts) if curriculum is None else \
        [curriculum.stage_indices(s).size for s in range(curriculum.num_stages)]
    if sizes is None:  # sized by SE values: enough prompts for every stage at least
        stages = 1 if cur.mode == "continuous" else len(cur.thresholds) + 1 if cur.thresholds else cur.stages
        if prompts < stages * per_step:
            raise C.ConfigError(f"{prompts} usable prompts cannot fill {stages} curriculum stage(s) with one step "
                                f"(train.prompts_per_step={per_step}) each: lower train.prompts_per_step, {fewer}, "
                                f"or {more}")
        return
    small = [(s, n) for s, n in enumerate(sizes) if n < per_step]
    if not small:
        return
    s, n = small[0]
    if len(sizes) == 1:
        raise C.ConfigError(f"{n} {kind}, fewer than one step of train.prompts_per_step={per_step}: lower "
                            f"train.prompts_per_step or {more}")
    raise C.ConfigError(f"curriculum stage {s} holds {n} of the {sum(sizes)} {kind}, fewer than one step of "
                        f"train.prompts_per_step={per_step}: lower train.prompts_per_step, {fewer}, or {more}")


def build_val_set(cfg: C.RunConfig, tokenizer, heldout_records=None, *, instruction: str | None = None):
    """(prompt tokens, records) that `train.eval_every` evaluates, or None when it is off.

    `val.data` names a benchmark (`entrl.eval_suites.BENCHMARKS`, read from `eval.data_dir` or the hub) or
    a JSONL/Parquet file; empty, it is the task's held-out split (`heldout_records`). `val.max_problems`
    keeps the first N.
    """
    v = cfg.val
    if not cfg.train.eval_every:
        if v.data:
            log.warning("val.data=%r is set but train.eval_every=0: nothing evaluates it (set train.eval_every=N)",
                        v.data)
        return None
    if v.data:
        try:
            records = load_benchmark(v.data, data_dir=cfg.eval.data_dir or None, max_problems=v.max_problems).records
        except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
            raise C.ConfigError(f"val.data={v.data!r}: {e}") from None
    else:
        if heldout_records is None:  # RunConfig refuses this combination; a hand-built config may not
            raise C.ConfigError("train.eval_every needs val.data (this task has no held-out split)")
        records = list(heldout_records[:v.max_problems] if v.max_problems else heldout_records)
        if not records and cfg.data.task == "arithmetic":
            raise C.ConfigError(f"train.eval_every={cfg.train.eval_every} evaluates the held-out split, and "
                                "data.arithmetic_heldout_size=0 makes it empty; raise it or set val.data")
    if not records:
        raise C.ConfigError(f"val.data={v.data!r} holds no problems")
    return tokenize(cfg, records, tokenizer, instruction=instruction)


def reward_terms(cfg: C.RunConfig):
    """The `reward.fn` terms with their `reward.weights`, each imported now (`entrl.rewards.reward_fns`):
    a ConfigError in one line when one does not import, lacks the attribute or is not callable."""
    try:
        return reward_fns(cfg.reward.fn, cfg.reward.weights)
    except ValueError as e:
        raise C.ConfigError(f"reward.fn: {e}") from None


def build_verifier(cfg: C.RunConfig, *, math_only: bool = False):
    """The reward's `Verifier` with the `reward.fn` terms (`reward_terms`; `math_only`: the math grading
    alone, for annotation and evaluation, which never call the other terms) and the `reward.equivalent`
    answer equivalence; its worker processes start on first use."""
    rw = cfg.reward
    extra = {} if math_only else {"rewards": reward_terms(cfg)}
    try:
        verifier = Verifier(workers=rw.workers, timeout_s=rw.timeout_s, correct=rw.correct, incorrect=rw.incorrect,
                            equivalent=rw.equivalent or None, **extra)
    except ValueError as e:  # reward.equivalent that does not import
        raise C.ConfigError(f"reward.equivalent: {e}") from None
    if rw.equivalent or (not math_only and list(rw.fn) != [MATH_REWARD]):
        try:  # user code: the workers must import it too, checked now rather than at the first step
            verifier.start()
        except WorkerImportError as e:
            raise C.ConfigError(f"reward.fn / reward.equivalent: {e}") from None
    return verifier


@dataclasses.dataclass
class RunInputs:
    """What a run reads and checks on the host before any weights: built by `prepare_inputs`."""

    mesh: Any
    task: Any  # the `entrl.seams.Task`
    verifier: Any  # its `entrl.seams.Reward` (or the caller's)
    tokenizer: Tokenizer
    records: list  # the training prompts kept by `tokenize`
    prompt_tokens: list[list[int]]
    heldout: tuple | None  # the `val` set: (prompt tokens, records); None without train.eval_every


def prepare_inputs(cfg: C.RunConfig, *, verifier=None, task=None) -> RunInputs:
    """The mesh, tokenizer, prompts, `val` set and reward of a run, after every check that needs no weights:
    the model's origin and context (`check_model`) and the curriculum's stages where the prompt count sizes
    them (`check_stage_sizes`). Seconds next to what follows, so `train_from_config` runs it before the run
    directory is written, and `setup` before the SE annotation: a bad setting fails in one line before either.

    The reward comes last (its worker processes start when it runs user code): the caller closes it.
    """
    maybe_initialize_distributed()
    mesh = build_mesh(cfg)
    task = task or ConfiguredTask(cfg)
    tokenizer = build_tokenizer(cfg)
    records, heldout = task.records()
    prompt_tokens, records = tokenize(cfg, records, tokenizer, instruction=task.instruction)
    check_model(cfg, tokenizer)
    check_stage_sizes(cfg, len(records))
    col = cfg.curriculum.se_column
    if C.needs_semantic_entropy(cfg) and all(col in r.extra for r in records):  # SE read from the data, not
        # annotated: a value that is not a number fails here, before the model is built
        _column_numbers(records, col, f"the curriculum's SE column (curriculum.se_column={col!r})")
    held = build_val_set(cfg, tokenizer, heldout, instruction=task.instruction)
    verifier = verifier or task.reward()  # imports the reward functions: before anything compiles
    return RunInputs(mesh=mesh, task=task, verifier=verifier, tokenizer=tokenizer, records=records,
                     prompt_tokens=prompt_tokens, heldout=held)


def setup(cfg: C.RunConfig, *, se_values=None, verifier=None, task=None, inputs: RunInputs | None = None):
    """Everything a `Trainer` needs, validated before any compile.

    `task` (an `entrl.seams.Task`; default: `ConfiguredTask(cfg)`) gives the prompts, answers and reward;
    `verifier` (an `entrl.seams.Reward`) replaces the task's reward. `inputs`: `prepare_inputs`' result when the
    caller made it (its reward stays the caller's to close); else it is made here."""
    made = inputs is None
    inputs = inputs or prepare_inputs(cfg, verifier=verifier, task=task)
    try:
        return _components(cfg, inputs, se_values)
    except BaseException:
        if made and verifier is None:  # the reward this call started
            inputs.verifier.close()
        raise


def _components(cfg: C.RunConfig, inputs: RunInputs, se_values) -> Components:
    """`setup` after `prepare_inputs`: the policy, reference and sampler, the SE annotation when the curriculum
    needs it, the curriculum and its prompt pipeline."""
    mesh, tokenizer, verifier, records = inputs.mesh, inputs.tokenizer, inputs.verifier, inputs.records
    prompt_tokens = inputs.prompt_tokens
    graphdef, params = build_policy(cfg, mesh, tokenizer)
    ref_params = reference_params(cfg, params)
    sampler = build_sampler(cfg, tokenizer, mesh, slots=cfg.rollout.slots)
    if se_values is None and will_annotate(cfg, records):
        if not cfg.curriculum.annotate:
            build_curriculum(cfg, records)  # raises the missing-column error
        out_path = R.as_path(cfg.train.out_dir, "train.out_dir") / "semantic_entropy.jsonl"
        if cfg.curriculum.refresh and cfg.curriculum.samples != cfg.rollout.n:
            log.warning("curriculum.refresh ranks the annotation's SE (N = curriculum.samples = %d) among SE of the "
                        "training rollouts (N = rollout.n = %d): estimates of different N (SE <= ln N) until every "
                        "prompt was trained on", cfg.curriculum.samples, cfg.rollout.n)
        # What will run, before what may be hours of annotation (the stages are sized after it).
        log_startup_summary(log, cfg, verifier=verifier, params=params, mesh=mesh, pipeline=None,
                            out_dir=cfg.train.out_dir, settings=step_settings(cfg, data_shards(mesh)),
                            prompts=len(records))
        # Batches of a rollout call's prompts, all of that shape: with curriculum.samples == rollout.n (the
        # paper's 8 and 8) the annotation runs the rollout's own sampler program (one compile, and the memory
        # the plan checked); else `entrl plan` plans its program as the annotate phase.
        stats = annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, verifier=verifier,
                                 out_path=out_path, mesh=mesh, batch_prompts=annotation_batch_prompts(cfg),
                                 same_shape=True)
        se_values = [s["se"] for s in stats]
        records = [dataclasses.replace(r, extra={**r.extra, **s}) for r, s in zip(records, stats)]
    curriculum = build_curriculum(cfg, records, se_values)
    check_stage_sizes(cfg, len(records), curriculum)  # sized by the annotation's SE values
    per_process = cfg.train.prompts_per_step // jax.process_count()
    pipeline = PromptPipeline(prompt_tokens, curriculum, batch_size=per_process, pad_id=tokenizer.pad_token_id,
                              buckets=tuple(cfg.rollout.prompt_buckets), process_index=jax.process_index(),
                              process_count=jax.process_count(), refresh=cfg.curriculum.refresh)
    return Components(cfg=cfg, mesh=mesh, graphdef=graphdef, params=params, ref_params=ref_params,
                      tokenizer=tokenizer, records=records, prompt_tokens=prompt_tokens, curriculum=curriculum,
                      pipeline=pipeline, sampler=sampler, verifier=verifier, heldout=inputs.heldout)


def save_policy(graphdef, params, tokenizer, out_dir, *, dtype: str | None = None,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write the policy as an HF checkpoint (plus its tokenizer) to `out_dir` (local or gs://), staged
    (`entrl.rundir.staged_dir`: an earlier `out_dir` is replaced whole, and only once this one is complete).

    Every process must call this: gathering sharded params to the host is a collective.
    Process 0 writes. LoRA adapters are merged into their kernels first (a plain checkpoint);
    `dtype` then casts the floating params (None keeps theirs). `extra_files`: name -> text, written with it.
    """
    out = R.as_path(out_dir, "policy directory")
    model = lora.merge_adapters(nnx.merge(graphdef, params))
    if dtype is not None:
        want = jnp.dtype(dtype)
        graphdef, params = nnx.split(model)
        params = jax.tree.map(lambda x: x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        model = nnx.merge(graphdef, params)
    primary = jax.process_index() == 0
    with R.staged_dir(out) if primary else contextlib.nullcontext(out) as local:  # never a half-written model
        save_pretrained(model, Path(os.fspath(local)))  # every process: its gather is a collective
        if primary:
            tokenizer.save(Path(os.fspath(local)))
            for name, text in (extra_files or {}).items():
                (Path(os.fspath(local)) / name).write_text(text)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("entrl_save_policy")
    return R.native(out)


def source_dtype(cfg: C.RunConfig) -> str:
    """The dtype the policy's model came in: its HF config's torch_dtype (float32 for the demo model)."""
    run = run_checkpoint_source(cfg.model.path)
    if run is not None:
        return source_dtype(run.cfg)
    if cfg.model.path == "demo":
        return "float32"
    hf = json.loads((resolve_model_dir(cfg.model.path, weights=False) / "config.json").read_text())
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


# ---------------------------------------------------------------------------
# The demo model's warm start (`warmstart` section)
# ---------------------------------------------------------------------------


def warm_start(cfg: C.RunConfig, tokenizer, train_records, *, seed: int | None = None):
    """Random-init demo model + noisy-teacher SFT (the `warmstart` section). Returns (graphdef, params, sft_losses)."""
    w = cfg.warmstart
    if seed is None:
        seed = w.seed if w.seed >= 0 else cfg.train.seed
    task = arithmetic_task(cfg)
    rng = np.random.default_rng(seed + 1)
    # SFT problems: a larger draw of the training split (the RL prompt pool is part of it; held-out never is).
    sft_records = task.make_problems(max(w.problems, len(train_records)), seed=seed, split="train")
    prompts = [tokenizer.encode(build_prompt(r.problem, tokenizer, suffix="", chat_template=True))
               for r in sft_records]
    responses = [tokenizer.encode(task.noisy_solution(r.problem, rng, w.error_rate)) + [tokenizer.eos_token_id]
                 for r in sft_records]
    graphdef, params = build_model(cfg, None, tokenizer)
    params, losses = train_sft(graphdef, params, prompts, responses, pad_id=tokenizer.pad_token_id,
                               steps=w.steps, batch_size=w.batch, lr=w.lr, seed=seed,
                               prompt_len=max(cfg.rollout.prompt_buckets),
                               # the teacher's solutions, whole, even when RL samples shorter responses
                               response_len=max(cfg.rollout.max_new_tokens, max(map(len, responses))))
    return graphdef, params, losses


def warm_started(cfg: C.RunConfig, directory) -> C.RunConfig:
    """`cfg` with `model.path` at its warm start in `directory` (made there by `warm_start` unless it
    is already there, so a resumed run reuses it) and `warmstart.enabled` off. What `entrl train`
    does with a `warmstart.enabled` config."""
    out = R.as_path(directory, "warm-start directory")
    if not (out / "config.json").exists():
        tokenizer = build_tokenizer(cfg)
        train_records, _ = build_records(cfg)
        log.info("warm start: SFT of the demo model on the noisy teacher (%d steps, %.0f%% flawed solutions)",
                 cfg.warmstart.steps, 100 * cfg.warmstart.error_rate)
        graphdef, params, _ = warm_start(cfg, tokenizer, train_records)
        save_policy(graphdef, params, tokenizer, out)
    return C.replace(cfg, **{"model.path": str(out), "model.tokenizer": str(out), "warmstart.enabled": False})


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after writing a checkpoint; rerunning the same command resumes it."""

    def __init__(self, step: int, out_dir):
        super().__init__(f"stopped by SIGTERM after step {step}; its checkpoint is in {out_dir}; "
                         "run the same command again to resume")
        self.step = step


class DoesNotFit(C.ConfigError):
    """The run's memory plan exceeds the devices' memory."""


# What lowers each phase's peak (besides more devices), for the refusal of a run that cannot fit.
_MEMORY_KNOBS = {
    "update_peak": "model.remat=full, a smaller train.microbatch_per_shard",
    "logprob_peak": "a smaller train.microbatch_per_shard",
    "rollout_peak": "rollout.slots (fewer rows decoding at once), rollout.cache_dtype=bfloat16",
    "annotate_peak": "rollout.slots, curriculum.samples",
    "eval_peak": "val.n, val.max_new_tokens, rollout.slots (and with val.entropy, train.microbatch_per_shard)",
}


def will_annotate(cfg: C.RunConfig, records) -> bool:
    """Whether `setup` annotates the prompts' semantic entropy (the curriculum needs it and the data lacks it)."""
    return C.needs_semantic_entropy(cfg) and any(cfg.curriculum.se_column not in r.extra for r in records)


def check_memory(cfg: C.RunConfig, *, annotates: bool = True) -> None:
    """With `train.memory_check` on an accelerator that reports its memory, plan the run (`entrl.plan`,
    no weights read) and raise `DoesNotFit` (after logging the plan's table) when it cannot fit.
    annotates: whether the run will annotate its prompts (`will_annotate`)."""
    if not cfg.train.memory_check:
        return
    budget, source = plan.device_budget()
    if budget is None:  # CPU, or a backend without memory stats: nothing to check against
        log.info("memory check skipped (%s)", source)
        return
    run_plan = plan.plan_run(cfg, budget_bytes=budget, budget_source=source, annotates=annotates)
    log.info("memory plan:\n%s", run_plan.table())
    if not run_plan.fits:
        worst = max((k for k in run_plan.per_device_bytes if k.endswith("_peak")), key=run_plan.per_device_bytes.get)
        raise DoesNotFit(f"the run needs {run_plan.peak_bytes / 2**30:.1f} GiB per device ({worst}) of "
                         f"{budget / 2**30:.1f} GiB ({run_plan.headroom:.0%} kept free); see the plan above "
                         f"(`entrl plan`): {_MEMORY_KNOBS.get(worst, 'see the plan')}, or more devices "
                         "(train.memory_check=false skips this check)")


def train_from_config(cfg: C.RunConfig, *, resume: bool = True, overwrite: bool = False,
                      max_steps: int | None = None):
    """Lock the run directory, set up, train, write the final policy to `<out_dir>/policy`.

    Returns the Trainer (closed). `resume=False` in a directory that already holds a run raises
    ConfigError unless `overwrite` (which deletes that run first). Raises `Preempted` when the run
    stopped on SIGTERM (a checkpoint is written, `policy/` is not).
    """
    maybe_initialize_distributed()
    reward_terms(cfg)  # a reward function that does not import fails before anything is read
    # Every check that needs no weights, before the run directory is written (a failed start leaves none behind)
    # and before the memory plan. The warm start below changes model.path only: to the same demo model and
    # tokenizer, trained, so these inputs stay the run's.
    inputs = prepare_inputs(cfg)
    try:
        run_dir = R.RunDir.open(cfg.train.out_dir, resume=resume, overwrite=overwrite, config=C.to_dict(cfg))
        try:
            check_memory(cfg, annotates=will_annotate(cfg, inputs.records))
            if cfg.warmstart.enabled:  # the demo model's noisy-teacher SFT, once per run directory
                cfg = warm_started(cfg, run_dir.path / "warmstart")
            comps = setup(cfg, inputs=inputs)
            trainer = Trainer(comps, run_dir=run_dir)
            try:
                trainer.run(max_steps=max_steps, resume=resume and not overwrite)
                if trainer.preempted:
                    raise Preempted(trainer.step, run_dir.path / "checkpoints")
                save_policy(comps.graphdef, trainer.params, comps.tokenizer, run_dir.path / "policy")
            finally:
                trainer.close()
        except BaseException:
            run_dir.discard()  # removes the directory when the start wrote nothing but its record there
            raise
        finally:
            run_dir.close()
    finally:
        inputs.verifier.close()
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
    if R.inside(out, run):
        raise C.ConfigError(f"--out {out_dir!r} is inside the run {run_dir!r}: export writes outside the run "
                            "(its policy/ is the end of run's)")
    previous = out / EXPORT_RECORD
    if out.exists() and any(True for _ in out.iterdir()) and not previous.exists():
        raise C.ConfigError(f"--out {out_dir!r} is a non-empty directory that no `entrl export` wrote; give a new or "
                            "empty directory (a model there is never overwritten)")
    source = RunSource(run, C.from_dict(stored))
    cfg = run_model_config(source.cfg, source)
    tokenizer = build_tokenizer(cfg)
    # Params FSDP-sharded over whatever devices this machine has: the run's batch layout (build_mesh's
    # checks) is irrelevant to an export, which may run on a different machine than the training.
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    graphdef, params = build_policy(cfg, mesh, tokenizer)  # under LoRA: the base, and the run's adapters restored
    restored = restore_run_params(source, (graphdef, params), step=step)
    dtype = dtype or source_dtype(cfg)
    # An earlier export is replaced whole: none of its weight shards or tokenizer files (a chat template
    # transformers would load) may linger. Locally the staged write replaces the directory; a bucket's
    # objects are deleted first.
    if jax.process_index() == 0 and previous.exists() and R.is_remote(out):
        for f in out.iterdir():
            f.rmtree() if f.is_dir() else f.unlink()
    record = json.dumps({"run": os.fspath(run), "step": restored.step, "dtype": dtype}) + "\n"
    save_policy(graphdef, restored.params, tokenizer, out, dtype=dtype, extra_files={EXPORT_RECORD: record})
    if jax.process_index() == 0:
        log.info("exported step %d of %s to %s (%s)", restored.step, run_dir, out, dtype)
    return R.native(out)


EXPORT_RECORD = "entrl_export.json"  # what `entrl export` wrote into its --out (run, step, dtype)


def annotate_dataset(cfg, *, data: str, out: str, n: int | None = None, resume: bool = True) -> int:
    """Annotate a dataset with the policy of `cfg.model` and write it out (`entrl semantic-entropy`);
    returns the number of prompts written.

    Writes `out` (.jsonl or .parquet: the input columns plus `entrl.semantic_entropy.SE_COLUMNS`),
    `<out>.se_hist.png` and `<out>.provenance.json` (what the values were computed with:
    `entrl.annotate.se_provenance`). Progress lives in `<out>.progress.jsonl`; rerunning the same
    command resumes from it, unless the settings changed
    or `resume=False` (`--no-resume`): then the old progress is moved aside and everything is sampled
    again. `out` may be a gs:// path (the outputs are written locally, then uploaded).
    """
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=data))
    out_p = R.as_path(out, "--out")
    if out_p.suffix not in (".jsonl", ".parquet"):
        raise C.ConfigError(f"--out {out!r}: must end in .jsonl or .parquet")
    mesh = build_mesh(cfg)
    tokenizer = build_tokenizer(cfg)
    check_model(C.replace(cfg, **{"train.eval_every": 0}), tokenizer)  # what sampling needs: no training run's evaluation
    records, _ = build_records(cfg)
    prompt_tokens, records = tokenize(cfg, records, tokenizer)
    graphdef, params = build_model(cfg, mesh, tokenizer)
    progress = out_p.with_name(out_p.name + ".progress.jsonl")
    with build_verifier(cfg, math_only=True) as verifier:
        stats = annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, verifier=verifier,
                                 out_path=progress, n=n, mesh=mesh, resume=resume)
    d = cfg.data  # the input's own column layout: the same config reads the annotated file back
    rows = [{**r.to_row(id_key=d.id_key, problem_key=d.problem_key, answer_key=d.answer_key), **s}
            for r, s in zip(records, stats)]
    with R.local_copy_for_upload(out_p.parent) as local_dir:
        local = Path(os.fspath(local_dir)) / out_p.name
        write_records(local, rows)
        plot_se_histogram([s["se"] for s in stats], local.with_name(local.name + ".se_hist.png"))
        local.with_name(local.name + ".provenance.json").write_text(json.dumps(
            {"provenance": read_progress(progress)[0], "data": data, "prompts": len(rows)}, indent=2) + "\n")
    return len(rows)
