"""Typed run configuration: frozen dataclasses, YAML presets, dotted overrides.

Design decisions:
- One run = one `RunConfig`, a tree of small frozen dataclasses. Every field has a
  one-line comment; `docs_table()` turns those comments into the README's
  configuration reference so it cannot drift.
- YAML files are thin: a preset may name `base: other.yaml` (relative path) and
  only override what differs. Overrides from the command line use dotted keys
  (`loss.name=sent`, `model.dtype=bfloat16`) and are parsed with YAML scalar
  rules (`1e-6` -> float, `true` -> bool, `[1, 2]` -> list).
- Errors are explicit: unknown keys name the closest valid key, values of the
  wrong type name the expected type, invalid values say what is allowed. All of
  this happens before anything touches a device. Every float field must be
  finite (no section has a setting where NaN or inf means something; a NaN
  slips through every `<`/`>` check, e.g. `reward.timeout_s=nan` would disable
  every verification deadline). Loss hyperparameters, where `.inf` does mean
  something (`dual_clip`), have their own ranges.
- Loss hyperparameters are a free-form mapping (`loss.params`) because each loss
  has its own; they are validated against that loss's declaration in
  `entrl.rl.loss_specs` (which imports no jax) when the section is built. The
  field comments may name `{losses}`, `{agg_modes}` or `{kl_kinds}`: the
  reference table lists the registered names there.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entrl.rl.loss_specs import AGG_MODES, KL_KINDS, LOSSES, RULES, LossParamError, resolve_params, validate_loss_params

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to change."""


MATH_REWARD = "entrl.rewards:math_reward"  # the default reward term (`entrl.rewards.MATH_REWARD`)
# `reward.fn` entries: package.module:function or path/to/file.py:function (the form is checked here, the
# import by `entrl.rl.setup.reward_terms`); the same pattern as `entrl.rewards._SPEC_RE`
_REWARD_SPEC_RE = re.compile(r"(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:]+\.py):[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


# The projections LoRA can adapt (`entrl.models.lora.TARGETS`: the decoder's `<name>_kernel`s).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# PEFT's module names for them (`target_modules`, what TRL and verl configs hold), read as ours.
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down"}


@dataclass(frozen=True)
class ModelSection:
    path: str = "demo"  # HF checkpoint dir, hub id, entrl run dir, or "demo" (built-in tiny Qwen2 model)
    tokenizer: str = ""  # tokenizer dir / hub id; empty = same as `path` ("char" = built-in character tokenizer)
    dtype: str = "float32"  # compute dtype (activations, matmuls, sampler and reference copies): float32 | bfloat16
    param_dtype: str = "float32"  # dtype of the trained (master) weights, their gradients and AdamW moments: float32 | bfloat16
    remat: str = "none"  # recompute each decoder layer in the backward pass: none | full (keep layer inputs) | dots (also keep weight-matmul outputs)
    demo_hidden: int = 128  # demo model only: hidden size
    demo_layers: int = 2  # demo model only: decoder layers
    demo_heads: int = 4  # demo model only: attention heads (2 KV heads)
    lora_rank: int = 0  # LoRA adapter rank r; 0 = off (full fine-tuning). On: only the adapters train (in param_dtype); the frozen base is kept in dtype
    lora_alpha: float = 32.0  # LoRA scale numerator: each adapted kernel computes with W + (lora_alpha / lora_rank) A B
    lora_targets: list[str] | str = field(default_factory=lambda: list(LORA_TARGETS))  # projections that get adapters: q k v o (attention), gate up down (MLP); PEFT's names (q_proj, ..., down_proj, all-linear) are read as these

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _choice("model.remat", self.remat, ("none", "full", "dots"))
        _non_negative("model.lora_rank", self.lora_rank)
        _all_finite(self, "model")
        _positive("model.lora_alpha", self.lora_alpha)
        targets = [self.lora_targets] if isinstance(self.lora_targets, str) else list(self.lora_targets)
        if targets == ["all-linear"]:  # PEFT's "every linear layer but the output head"
            targets = list(LORA_TARGETS)
        object.__setattr__(self, "lora_targets", [PEFT_TARGETS.get(t, t) for t in targets])
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            what = f"{unknown[0]!r} is not a projection" if unknown else "name each projection once, at least one"
            raise ConfigError(f"model.lora_targets={self.lora_targets}: {what}; choose from {', '.join(LORA_TARGETS)}")
        _positive("model.demo_hidden", self.demo_hidden)
        _positive("model.demo_layers", self.demo_layers)
        _positive("model.demo_heads", self.demo_heads)


@dataclass(frozen=True)
class MeshSection:
    data: int = -1  # data-parallel axis size; -1 = all devices not used by the other axes
    fsdp: int = 1  # fully-sharded data-parallel axis size (params sharded, batch split)
    tensor: int = 1  # tensor-parallel axis size (heads / MLP columns)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{name}={v}: must be a positive size or -1 (fill)")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")


@dataclass(frozen=True)
class DataSection:
    task: str = "math"  # math (text problems with reference answers) | arithmetic (built-in synthetic task)
    train: str = ""  # JSONL/Parquet path or hub id of the training prompts
    split: str = "train"  # split name for hub datasets
    id_key: str = "id"  # column holding a row id ("" = row index; dotted for nested, e.g. extra_info.index)
    problem_key: str = "problem"  # column holding the problem: text, or chat messages (verl / TRL `prompt`)
    answer_key: str = "answer"  # column holding the reference answer (dotted for nested, e.g. reward_model.ground_truth)
    prompt_suffix: str = "Please reason step by step, and put your final answer within \\boxed{}."  # appended to each plain-text problem (never to chat-message prompts)
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template (chat-message prompts need it)
    max_prompt_len: int = 1024  # prompts longer than this (tokens) are dropped or rejected
    on_long_prompt: str = "drop"  # drop (counted, logged) | error
    on_bad_row: str = "error"  # error | skip (counted, logged) for rows with a missing/empty problem or answer
    max_rows: int = 0  # use only the first N rows (0 = all)
    arithmetic_train_size: int = 4000  # arithmetic task: number of training problems
    arithmetic_heldout_size: int = 1000  # arithmetic task: number of held-out problems
    arithmetic_max_number: int = 9  # arithmetic task: operands are 1..max_number
    arithmetic_max_operands: int = 3  # arithmetic task: 2..max_operands operands per expression
    arithmetic_seed: int = -1  # arithmetic task: seed of the drawn train / held-out problems (-1 = train.seed; fixed = one dataset for every seed)

    def __post_init__(self):
        _choice("data.task", self.task, ("math", "arithmetic"))
        _choice("data.on_long_prompt", self.on_long_prompt, ("drop", "error"))
        _choice("data.on_bad_row", self.on_bad_row, ("error", "skip"))
        _positive("data.max_prompt_len", self.max_prompt_len)
        _non_negative("data.max_rows", self.max_rows)
        _positive("data.arithmetic_max_number", self.arithmetic_max_number)
        _non_negative("data.arithmetic_train_size", self.arithmetic_train_size)
        _non_negative("data.arithmetic_heldout_size", self.arithmetic_heldout_size)
        if self.task == "arithmetic":
            _positive("data.arithmetic_train_size", self.arithmetic_train_size)
        _seed("data.arithmetic_seed", self.arithmetic_seed, unset=True)
        if self.arithmetic_max_operands < 2:
            raise ConfigError(f"data.arithmetic_max_operands={self.arithmetic_max_operands}: must be >= 2")


CURRICULUM_ORDERS = ("low_to_high", "high_to_low", "random")
STAGE_BOUNDARIES = ("continue", "reset_optimizer", "restart")


@dataclass(frozen=True)
class CurriculumSection:
    enabled: bool = True  # order prompts by semantic entropy (False = plain shuffled epochs)
    se_column: str = "se"  # column with the per-prompt semantic entropy
    annotate: bool = True  # compute SE with the current policy before training when the column is missing
    samples: int = 8  # N responses per prompt for the SE annotation
    stages: int = 2  # number of equal-count SE quantile stages
    thresholds: list[float] = field(default_factory=list)  # explicit SE stage boundaries (overrides `stages`)
    epochs_per_stage: int = 5  # epochs over each stage before moving to the next
    mode: str = "staged"  # staged | continuous (one low-to-high pass, no stages)
    order: str = "low_to_high"  # stage order: low_to_high (SENT) | high_to_low | random (stages of a seeded random split, SE unused; ablations)
    drop_trivial: bool = False  # drop prompts whose SE samples were all correct or all wrong (pass_rate 0 or 1)
    refresh: bool = False  # online SE: at every epoch boundary re-rank the prompts by the SE of their latest training rollouts (annotation SE for prompts not trained on yet); stage sizes stay
    se_no_answer: str = "singleton"  # responses without an extractable answer: singleton (each its own class) | shared (one "no answer" class)
    se_weighting: str = "count"  # class probabilities: count (|C_k| / N) | likelihood (by the samples' sequence probabilities) | likelihood_per_token (by their per-token geometric means)
    seed: int = 0  # seed of the tie-break and per-epoch within-stage shuffles

    def __post_init__(self):
        _all_finite(self, "curriculum")
        _choice("curriculum.mode", self.mode, ("staged", "continuous"))
        _choice("curriculum.order", self.order, CURRICULUM_ORDERS)
        _choice("curriculum.se_no_answer", self.se_no_answer, ("singleton", "shared"))
        _choice("curriculum.se_weighting", self.se_weighting, ("count", "likelihood", "likelihood_per_token"))
        _positive("curriculum.stages", self.stages)
        _positive("curriculum.epochs_per_stage", self.epochs_per_stage)
        _positive("curriculum.samples", self.samples)
        _seed("curriculum.seed", self.seed)
        if list(self.thresholds) != sorted(self.thresholds):
            raise ConfigError(f"curriculum.thresholds={self.thresholds}: must be ascending")
        if any(t < 0 for t in self.thresholds):  # semantic entropy is >= 0: such a stage would stay empty
            raise ConfigError(f"curriculum.thresholds={self.thresholds}: semantic entropy is never negative")
        if self.refresh and (self.thresholds or self.order == "random" or not self.enabled):
            raise ConfigError("curriculum.refresh re-ranks prompts by SE into stages of fixed sizes: it needs "
                              "curriculum.enabled, an SE order (not order=random) and curriculum.stages (not thresholds)")
        if self.thresholds and self.order == "random":
            raise ConfigError("curriculum.thresholds split by SE value, curriculum.order=random ignores SE: give "
                              "curriculum.stages instead")


@dataclass(frozen=True)
class RolloutSection:
    n: int = 8  # responses sampled per prompt (the GRPO group size)
    temperature: float = 1.0  # sampling temperature (0 = greedy); also the temperature of all log-probs
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 2048  # maximum response length
    prompt_buckets: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])  # left-pad prompts to the smallest fitting bucket
    cache_dtype: str = "auto"  # KV-cache dtype: auto (= model.dtype) | float32 | bfloat16
    slots: int = 0  # at most this many (prompt, sample) rows decode at once, each slot refilled with the next row when its row stops; bounds the KV cache (0 = all rows of a step); a multiple of the data shards
    reuse_sampler_logprobs: bool = False  # use the sampler's log-probs as old log-probs instead of a recompute

    def __post_init__(self):
        _all_finite(self, "rollout")
        _positive("rollout.n", self.n)
        if self.n < 2:  # every group-relative advantage would be 0: nothing would train
            raise ConfigError(f"rollout.n={self.n}: GRPO-style advantages compare the n responses of a prompt, so "
                              "rollout.n must be >= 2")
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={self.top_p}: must be in (0, 1]")
        _non_negative("rollout.top_k", self.top_k)
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        for i, bucket in enumerate(self.prompt_buckets):
            _positive(f"rollout.prompt_buckets[{i}]", bucket)
        _choice("rollout.cache_dtype", self.cache_dtype, ("auto", "float32", "bfloat16"))
        _non_negative("rollout.slots", self.slots)
        if not self.prompt_buckets or list(self.prompt_buckets) != sorted(self.prompt_buckets):
            raise ConfigError(f"rollout.prompt_buckets={self.prompt_buckets}: must be a non-empty ascending list")


@dataclass(frozen=True)
class LossSection:
    name: str = "sent"  # policy loss: {losses}
    params: dict[str, Any] = field(default_factory=dict)  # overrides of that loss's preset hyperparameters (README: Supported models and losses)
    agg: str = "token-mean"  # {agg_modes}
    scope: str = "auto"  # token-selection scope: auto (the loss's own: sent_released as released, the others global) | global (whole mini-batch) | microbatch (per data shard, loss.scope_seqs sequences each)
    scope_seqs: int = 0  # sequences per data shard in one selection scope under scope=microbatch, independent of train.microbatch_per_shard (0 = the loss's own: 4 for sent_released; else the memory micro-batch)
    advantage: str = "grpo"  # grpo (group mean/std) | drgrpo (no std division)
    kl_coef: float = 0.001  # reference-KL coefficient (0 skips the reference forward)
    kl_estimator: str = "k3"  # {kl_kinds} (k3: verl's low_var_kl)

    def __post_init__(self):
        _all_finite(self, "loss")
        _choice("loss.agg", self.agg, AGG_MODES)
        _choice("loss.scope", self.scope, ("auto", "global", "microbatch"))
        _non_negative("loss.scope_seqs", self.scope_seqs)
        _choice("loss.advantage", self.advantage, ("grpo", "drgrpo"))
        _choice("loss.kl_estimator", self.kl_estimator, KL_KINDS)
        if self.kl_coef < 0:
            raise ConfigError(f"loss.kl_coef={self.kl_coef}: must be >= 0")
        # YAML 1.1 reads `1e-3`, `nan` and `1e999` as strings: numeric hyperparameters take them as float fields do
        object.__setattr__(self, "params", {k: _float_text(v) if k in RULES and not RULES[k].choices else v
                                            for k, v in self.params.items()})
        try:
            validate_loss_params(self.name, self.params)
        except LossParamError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-6  # peak learning rate (AdamW)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.999  # AdamW beta2
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    schedule: str = "constant"  # constant | cosine | linear (decay to 0 over train.steps)
    warmup_steps: int = 0  # linear warm-up optimizer steps

    def __post_init__(self):
        _all_finite(self, "optim")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)}: must be in [0, 1)")
        _non_negative("optim.weight_decay", self.weight_decay)
        _choice("optim.schedule", self.schedule, ("constant", "cosine", "linear"))
        _non_negative("optim.warmup_steps", self.warmup_steps)
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}: must be >= 0")


@dataclass(frozen=True)
class RewardSection:
    correct: float = 1.0  # math_reward's value for a verified answer
    incorrect: float = 0.0  # math_reward's value for a wrong, missing or unverifiable answer
    timeout_s: float = 5.0  # per-response time limit of the math verifier and of each reward.fn call (past it: 0 and counted)
    workers: int = 0  # verification processes, which also run the reward.fn terms (0 = number of CPUs, capped at 8; at most 256)
    fn: list[str] | str = field(default_factory=lambda: [MATH_REWARD])  # reward terms: package.module:function or path/to/file.py:function, each called as fn(response, reference answer, record) -> float in the verification processes with reward.timeout_s (README: Custom rewards); entrl.rewards:math_reward is the math verifier
    weights: list[float] = field(default_factory=list)  # weight of each reward.fn term (empty = 1.0 each); the reward is their weighted sum
    equivalent: str = ""  # the answer equivalence (pred, gold) -> bool as package.module:function or path/to/file.py:function, run in the verification processes; it grades accuracy, math_reward, evaluation and SE clustering ("" = math-verify)

    def __post_init__(self):
        _all_finite(self, "reward")
        if self.timeout_s <= 0:
            raise ConfigError(f"reward.timeout_s={self.timeout_s}: must be > 0")
        _non_negative("reward.workers", self.workers)
        if self.workers > MAX_REWARD_WORKERS:  # each is a Python process with math-verify loaded (~75 MB)
            raise ConfigError(f"reward.workers={self.workers}: at most {MAX_REWARD_WORKERS} verification processes "
                              "per host (0 = one per CPU, capped at 8)")
        if isinstance(self.fn, str):  # one term may be given as a plain string
            object.__setattr__(self, "fn", [self.fn])
        if not self.fn:
            raise ConfigError(f"reward.fn is empty: name at least one reward function (default {MATH_REWARD})")
        for i, spec in enumerate(self.fn):
            if not _REWARD_SPEC_RE.fullmatch(spec):
                raise ConfigError(f"reward.fn[{i}]={spec!r}: expected package.module:function or "
                                  f"path/to/file.py:function, e.g. {MATH_REWARD}")
        if self.equivalent and not _REWARD_SPEC_RE.fullmatch(self.equivalent):
            raise ConfigError(f"reward.equivalent={self.equivalent!r}: expected package.module:function or "
                              "path/to/file.py:function (empty = math-verify)")
        if len(set(self.fn)) != len(self.fn):
            raise ConfigError(f"reward.fn={self.fn}: names a function twice")
        if self.weights and len(self.weights) != len(self.fn):
            raise ConfigError(f"reward.weights={self.weights}: {len(self.weights)} weights for the {len(self.fn)} "
                              "reward.fn terms (give one per term, or none for 1.0 each)")
        if self.weights and not any(self.weights):
            raise ConfigError(f"reward.weights={self.weights}: all 0, so every response would get the same reward")


@dataclass(frozen=True)
class TrainSection:
    out_dir: str = "runs/default"  # run directory (metrics, checkpoints, plots)
    seed: int = 0  # global seed (params init of the demo model, sampling, shuffles)
    steps: int = 0  # RL steps to run (0 = until the curriculum is exhausted)
    prompts_per_step: int = 256  # prompts per RL step (each sampled `rollout.n` times)
    minibatch_prompts: int = 128  # prompts per optimizer step
    microbatch_per_shard: int = 0  # sequences per data shard per forward/backward (gradient accumulation; verl's ppo_micro_batch_size_per_gpu); 0 = a shard's whole mini-batch at once
    ppo_epochs: int = 1  # passes over the rollout batch
    length_buckets: int = 4  # the log-prob and update forwards run each micro-batch up to its longest response, rounded up to one of ceil(rollout.max_new_tokens * k / K), k = 1..K (one compiled branch each; 1 = always max_new_tokens)
    only_mixed_groups: bool = False  # update only on groups whose rewards are not all equal
    checkpoint_every: int = 50  # RL steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # checkpoints kept on disk
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps
    stage_boundary: str = "continue"  # at each new curriculum stage: continue (one run: reference = initial model, optimizer kept) | reset_optimizer (fresh optimizer) | restart (the release's new run: reference <- current policy, fresh optimizer)
    eval_every: int = 0  # RL steps between evaluations on the `val` set, logged as eval/... (0 = off)
    log_every: int = 1  # RL steps between console lines
    memory_check: bool = True  # on accelerators, plan the run's memory (`entrl plan`) at start and refuse a run that cannot fit
    progress: str = "auto"  # tqdm progress bars with ETA (training, SE annotation, val evaluations, `entrl eval`) on stderr, drawn by process 0: auto (when stderr is a terminal) | on | off
    log_samples_every: int = 10  # RL steps between sample completions (the first of up to 4 prompts) written to <out_dir>/rollouts.jsonl and TensorBoard text; 0 = off
    tensorboard: bool = True  # write TensorBoard events
    wandb: bool = False  # log to Weights & Biases when installed
    wandb_project: str = "entrl"  # W&B project (with train.wandb)
    wandb_entity: str = ""  # W&B entity (team or user); empty = your default entity
    run_name: str = ""  # W&B run name; empty = out_dir's last two folders plus a hash of its absolute path (runs/a/sent and runs/b/sent differ)

    def __post_init__(self):
        _choice("train.progress", self.progress, ("auto", "on", "off"))
        _non_negative("train.log_samples_every", self.log_samples_every)
        if not self.wandb_project.strip():
            raise ConfigError("train.wandb_project is empty: name a W&B project")
        _seed("train.seed", self.seed)
        _non_negative("train.steps", self.steps)
        _positive("train.prompts_per_step", self.prompts_per_step)
        _positive("train.minibatch_prompts", self.minibatch_prompts)
        _non_negative("train.microbatch_per_shard", self.microbatch_per_shard)
        _positive("train.ppo_epochs", self.ppo_epochs)
        _positive("train.length_buckets", self.length_buckets)
        _non_negative("train.checkpoint_every", self.checkpoint_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        _choice("train.stage_boundary", self.stage_boundary, STAGE_BOUNDARIES)
        _non_negative("train.eval_every", self.eval_every)
        _positive("train.log_every", self.log_every)
        if self.prompts_per_step % self.minibatch_prompts:
            raise ConfigError(
                f"train.prompts_per_step={self.prompts_per_step} is not a multiple of "
                f"train.minibatch_prompts={self.minibatch_prompts}")


@dataclass(frozen=True)
class EvalSection:
    benchmarks: list[str] = field(default_factory=lambda: ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"])  # names or paths
    data_dir: str = ""  # directory holding <name>.jsonl files (empty = hub datasets)
    n: int = 32  # samples per problem
    k: list[int] = field(default_factory=lambda: [1, 8, 16, 32])  # k values of pass@k / avg@k / maj@k
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus mass
    top_k: int = 0  # top-k sampling (0 = off; the release's OpenCompass configs: top_p 0.9, top_k 50)
    max_new_tokens: int = 8000  # response budget
    max_problems: int = 0  # evaluate only the first N problems per benchmark (0 = all)
    batch_problems: int = 0  # problems per sampler call (0 = the most that fit the accelerator's memory; 64 on CPU)
    cache_dtype: str = "auto"  # KV-cache dtype of evaluation: auto (= model.dtype) | float32 | bfloat16
    seed: int = 0  # sampling seed of `entrl eval`
    out_dir: str = ""  # where `entrl eval` writes samples.jsonl and results (--out)

    def __post_init__(self):
        _all_finite(self, "eval")
        _positive("eval.n", self.n)
        _non_negative("eval.batch_problems", self.batch_problems)
        _choice("eval.cache_dtype", self.cache_dtype, ("auto", "float32", "bfloat16"))
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.top_p={self.top_p}: must be in (0, 1]")
        _non_negative("eval.top_k", self.top_k)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _non_negative("eval.max_problems", self.max_problems)
        _seed("eval.seed", self.seed)
        if any(k < 1 or k > self.n for k in self.k):
            raise ConfigError(f"eval.k={self.k}: every k must be in [1, eval.n={self.n}]")


@dataclass(frozen=True)
class ValSection:
    data: str = ""  # evaluation set of `train.eval_every`: "" = the task's held-out split (arithmetic only), a benchmark name (read from eval.data_dir, else the hub) or a JSONL/Parquet path (problem/answer columns)
    max_problems: int = 0  # evaluate only the first N problems of it (0 = all)
    n: int = 1  # samples per problem
    k: list[int] = field(default_factory=lambda: [1])  # k values of the logged eval/pass@k and eval/avg@k
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus mass
    top_k: int = 0  # top-k sampling (0 = off; its own setting, as verl's val_kwargs.top_k: rollout.top_k does not apply)
    max_new_tokens: int = 0  # response budget (0 = rollout.max_new_tokens)
    before_training: bool = True  # also evaluate the initial policy, logged at step 0 (with train.eval_every > 0)
    entropy: bool = False  # also log eval/entropy: the policy's mean token entropy on its samples of this fixed set (one more forward pass)

    def __post_init__(self):
        _all_finite(self, "val")
        _positive("val.n", self.n)
        _non_negative("val.max_problems", self.max_problems)
        _non_negative("val.max_new_tokens", self.max_new_tokens)
        if not self.k or any(k < 1 or k > self.n for k in self.k):
            raise ConfigError(f"val.k={self.k}: give k values in [1, val.n={self.n}]")
        if self.temperature < 0:
            raise ConfigError(f"val.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"val.top_p={self.top_p}: must be in (0, 1]")
        _non_negative("val.top_k", self.top_k)


@dataclass(frozen=True)
class WarmstartSection:
    enabled: bool = False  # demo model + arithmetic task only: before RL, SFT on a noisy teacher (what `entrl demo` does; entrl train / ablate write it to <out_dir>/warmstart)
    steps: int = 550  # SFT optimizer steps
    error_rate: float = 0.45  # share of the teacher's worked solutions that contain a realistic mistake
    problems: int = 4000  # SFT problems, drawn from the training split (never from the held-out one)
    batch: int = 64  # SFT batch size (sequences)
    lr: float = 2e-3  # SFT learning rate (AdamW)
    seed: int = -1  # seed of the warm start: init, SFT problems and order (-1 = train.seed); fixed, every seed of `entrl ablate` starts from one base model, as the paper's seeds share one pretrained model

    def __post_init__(self):
        _all_finite(self, "warmstart")
        _positive("warmstart.steps", self.steps)
        _seed("warmstart.seed", self.seed, unset=True)
        _positive("warmstart.problems", self.problems)
        _positive("warmstart.batch", self.batch)
        _positive("warmstart.lr", self.lr)
        if not 0.0 <= self.error_rate <= 1.0:
            raise ConfigError(f"warmstart.error_rate={self.error_rate}: must be in [0, 1]")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)  # policy model
    mesh: MeshSection = field(default_factory=MeshSection)  # device mesh
    data: DataSection = field(default_factory=DataSection)  # training prompts
    curriculum: CurriculumSection = field(default_factory=CurriculumSection)  # semantic-entropy curriculum
    rollout: RolloutSection = field(default_factory=RolloutSection)  # sampling
    loss: LossSection = field(default_factory=LossSection)  # policy loss and reference KL
    optim: OptimSection = field(default_factory=OptimSection)  # optimizer
    reward: RewardSection = field(default_factory=RewardSection)  # verifiable reward
    train: TrainSection = field(default_factory=TrainSection)  # RL loop
    eval: EvalSection = field(default_factory=EvalSection)  # evaluation
    val: ValSection = field(default_factory=ValSection)  # evaluation during training (train.eval_every)
    warmstart: WarmstartSection = field(default_factory=WarmstartSection)  # supervised warm start of the demo model

    def __post_init__(self):
        rows = self.train.minibatch_prompts * self.rollout.n
        if self.train.microbatch_per_shard and rows % self.train.microbatch_per_shard:
            raise ConfigError(
                f"train.microbatch_per_shard={self.train.microbatch_per_shard} must divide one mini-batch of "
                f"train.minibatch_prompts * rollout.n = {rows} sequences")
        if self.loss.scope_seqs and _scope_kind(self) == "global":
            raise ConfigError(f"loss.scope_seqs={self.loss.scope_seqs} sizes micro-batch selection scopes, but "
                              f"loss {self.loss.name!r} selects over the whole mini-batch: set loss.scope=microbatch "
                              "or drop loss.scope_seqs")
        if self.train.eval_every and self.data.task != "arithmetic" and not self.val.data:
            raise ConfigError(f"train.eval_every={self.train.eval_every} needs an evaluation set: data.task="
                              f"{self.data.task} has no held-out split; set val.data to a benchmark name (e.g. "
                              "math500, with val.max_problems) or a JSONL/Parquet file of problems and answers")
        if self.curriculum.refresh and self.curriculum.se_weighting != "count":
            raise ConfigError(f"curriculum.refresh ranks by the count-based SE of the training rollouts; with "
                              f"curriculum.se_weighting={self.curriculum.se_weighting} the annotation's values would "
                              "be ranked among SE of another definition: use se_weighting=count, or drop refresh")
        if self.warmstart.enabled and (self.model.path != "demo" or self.data.task != "arithmetic"):
            raise ConfigError("warmstart.enabled is the demo's noisy-teacher SFT: it needs model.path=demo and "
                              f"data.task=arithmetic (got model.path={self.model.path!r}, data.task={self.data.task!r})")


def selection_scope(cfg: RunConfig, shards: int) -> tuple[str, int]:
    """(scope, sequences per data shard in one scope): ("global", 0) or ("microbatch", q).

    `loss.scope=auto` takes the loss's own scope (`LossSpec.scope`: micro-batches of 4 sequences for
    `sent_released`, as released; global for the others); under micro-batch scope q is
    `loss.scope_seqs`, else the loss's own, else the memory micro-batch (`microbatch_per_shard`).
    """
    if _scope_kind(cfg) == "global":
        return "global", 0
    return "microbatch", cfg.loss.scope_seqs or LOSSES[cfg.loss.name].scope_seqs or microbatch_per_shard(cfg, shards)


def _scope_kind(cfg: RunConfig) -> str:
    """global | microbatch: `loss.scope`, or under `auto` the loss's own (`LossSpec.scope`)."""
    return LOSSES[cfg.loss.name].scope if cfg.loss.scope == "auto" else cfg.loss.scope


def microbatch_per_shard(cfg: RunConfig, shards: int) -> int:
    """Sequences per data shard per forward/backward: `train.microbatch_per_shard`, or (0) a shard's
    whole mini-batch."""
    return cfg.train.microbatch_per_shard or cfg.train.minibatch_prompts * cfg.rollout.n // shards


def needs_semantic_entropy(cfg: RunConfig) -> bool:
    """Whether the curriculum reads per-prompt SE (or the annotation's pass rates, for drop_trivial)."""
    cur = cfg.curriculum
    return cur.enabled and (cur.order != "random" or cur.drop_trivial)


# Settings a resumed run may change (`resume_changes`): where it runs (mesh.*: a run may move to another
# slice), its directory's name, how long it runs (train.steps, unless a decaying optim.schedule spans it), how often it
# checkpoints, logs and evaluates and where it logs to, its evaluations (eval.*, val.*: they never feed back into
# training), the memory check, and the knobs that leave every step's result the same: model.remat, rollout.slots,
# train.length_buckets, train.microbatch_per_shard (unless it sizes the loss's selection scopes), the verifier's
# reward.workers and reward.timeout_s. Every other key defines the training trajectory (the model and its adapters,
# the data and curriculum, sampling, the loss, the optimizer, the reward, the seeds, the batch sizes, the warm start)
# and must stay what the run started with, unless it has no effect in one of them (`_unused`).
RESUME_MAY_CHANGE = frozenset({
    "model.remat", "rollout.slots", "reward.workers", "reward.timeout_s", "train.out_dir", "train.steps",
    "train.microbatch_per_shard", "train.length_buckets", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_nonfinite_steps", "train.eval_every", "train.log_every", "train.memory_check", "train.progress",
    "train.log_samples_every", "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_entity",
    "train.run_name",
})
RESUME_MAY_CHANGE_SECTIONS = ("mesh", "eval", "val")


def resume_changes(started: dict, now: dict) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """The settings that differ between the config a run started with (`started`, as stored in its directory)
    and the one resuming it (`now`): ({dotted key: (was, now)}, `key was X, now Y` for each of them that a
    resumed run must keep, i.e. is not in `RESUME_MAY_CHANGE`).

    Both are read as RunConfigs first (keys added since take their defaults; ConfigError when `started` no longer
    reads); the hyperparameters of one loss compare as that loss's resolved values (its preset plus loss.params).
    """
    old, new = from_dict(started), from_dict(now)
    before, after = _flat(old), _flat(new)
    changed = {key: (before.get(key), value) for key, value in after.items() if before.get(key) != value}
    conflicts = []
    for key, (was, value) in changed.items():
        why = ""
        if key == "train.steps" and old.optim.schedule != "constant":
            why = f" (optim.schedule={old.optim.schedule} decays the learning rate over train.steps)"
        elif key == "train.microbatch_per_shard" and _scope_is_memory_microbatch(old):
            why = f" (it sizes the token-selection scopes of loss {old.loss.name!r}: see loss.scope_seqs)"
        elif (key in RESUME_MAY_CHANGE or key.split(".", 1)[0] in RESUME_MAY_CHANGE_SECTIONS
              or _unused(key, old) or _unused(key, new)):  # what made it unused differs too, and is named
            continue
        conflicts.append(f"{key} was {was!r}, now {value!r}{why}")
    return changed, conflicts


def _flat(cfg: RunConfig) -> dict[str, Any]:
    """{dotted key: value} of every setting; loss.params as the loss's resolved hyperparameters."""
    out = {f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
           for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    del out["loss.params"]
    out.update({f"loss.params.{k}": v for k, v in resolve_params(cfg.loss.name, cfg.loss.params).items()})
    return out


def _unused(key: str, cfg: RunConfig) -> bool:
    """Whether setting `key` has no effect under `cfg` (a demo-model key for another model, ...)."""
    if key.startswith("warmstart.") and key != "warmstart.enabled":
        return not cfg.warmstart.enabled
    if key.startswith("data.arithmetic_"):
        return cfg.data.task != "arithmetic"
    if key.startswith("model.demo_"):
        return cfg.model.path != "demo"
    return key in ("model.lora_alpha", "model.lora_targets") and not cfg.model.lora_rank


def _scope_is_memory_microbatch(cfg: RunConfig) -> bool:
    """Whether `selection_scope` falls back to the memory micro-batch (train.microbatch_per_shard)."""
    return _scope_kind(cfg) == "microbatch" and not (cfg.loss.scope_seqs or LOSSES[cfg.loss.name].scope_seqs)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(str, allowed))}{hint}")


def _all_finite(section: Any, prefix: str) -> None:
    """Raise ConfigError for a NaN or infinite value in any float (or list of float) field of `section`."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if hints[f.name] is float:
            values = [value]
        elif hints[f.name] == list[float]:
            values = list(value)
        else:
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}.{f.name}={value}: must be a finite number")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value}: must be > 0")


def _non_negative(name: str, value: int | float) -> None:
    if value < 0:
        raise ConfigError(f"{name}={value}: must be >= 0")


MAX_REWARD_WORKERS = 256  # more than the vCPUs of any TPU or GPU host; a typo like 10000 would start that many processes

SEED_LIMIT = 2**32  # seeds are 32-bit: numpy and JAX take them, and derived seeds (seed + offset) stay in range


def _seed(name: str, value: int, *, unset: bool = False) -> None:
    """A seed in [0, SEED_LIMIT); with `unset`, -1 too (= train.seed)."""
    if not (-1 if unset else 0) <= value < SEED_LIMIT:
        raise ConfigError(f"{name}={value}: must be in [0, 2**32)" + (", or -1 (= train.seed)" if unset else ""))


# ---------------------------------------------------------------------------
# Building from dicts, YAML files and dotted overrides
# ---------------------------------------------------------------------------


def _float_text(value: Any) -> Any:
    """`value` as a float when it is a string that reads as one (YAML 1.1 leaves `1e-6` a string), else as is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={value!r}: expected {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{path}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r}: expected null")
    if tp is float:
        value = _float_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: unsupported field type {tp}")


# Values read as another value: booleans of the old boolean `model.remat` (and of TRL's / verl's
# gradient-checkpointing flags, aliased to it) name a policy; YAML reads `on` / `off` as booleans.
VALUE_MAPS = {"model.remat": {True: "full", False: "none"}, "train.progress": {True: "on", False: "off"}}

# Keys that were renamed: old dotted key -> what to write instead.
RENAMED = {
    "train.microbatch_seqs": "train.microbatch_per_shard (sequences per data shard, not per mini-batch: "
                             "divide the old value by mesh.data * mesh.fsdp)",
}


# Keys whose old spelling means exactly one value of a newer key (old run directories keep loading):
# old dotted key -> (new field in the same section, old value -> new value).
MIGRATED = {
    "train.reset_optimizer_between_stages": ("stage_boundary", {True: "reset_optimizer", False: "continue"}),
}


def _build(cls: type, data: Any, prefix: str = ""):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in RENAMED:
            raise ConfigError(f"config key {path!r} was renamed: use {RENAMED[path]}")
        if path in VALUE_MAPS and isinstance(value, bool):
            value = VALUE_MAPS[path][value]
        if path in MIGRATED:
            new, values = MIGRATED[path]
            if new in data:
                raise ConfigError(f"{path} and {prefix}.{new} both given; {path} is the old spelling: keep {new}")
            if value not in values or not isinstance(value, bool):
                raise ConfigError(f"{path}={value!r}: expected true or false (now {prefix}.{new})")
            key, path, value = new, f"{prefix}.{new}", values[value]
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(path, value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def from_dict(data: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested dict."""
    return _build(RunConfig, data)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):  # loss.params merge too
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently: a
    second `rollout:` section would drop the first). Checked once per mapping node, before PyYAML's merge
    keys (`<<: *anchor`) rewrite it in place with the merged keys, which the mapping may then override."""

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_entrl_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    twice = key in seen
                except TypeError:  # an unhashable key: PyYAML's own error (a ConstructorError) says so later
                    break
                if twice:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML preset, resolving `base:` chains (paths relative to the file)."""
    given = str(path)
    path = Path(path)
    if not path.exists():
        # Only a bare preset name (`demo`, `demo.yaml`) may mean a built-in: `/home/me/exp/demo.yaml` that does
        # not exist is a typo or a missing file, never silently the packaged demo.
        name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
        bare = _is_bare_name(given)
        cands = [Path(__file__).parent.parent / "configs" / name, Path(__file__).parent / "configs" / name]
        found = next((c for c in cands if c.exists()), None) if bare else None
        if found is None:
            raise ConfigError(f"config file {given!r} does not exist")
        path = found
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: circular `base:` chain")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:  # the problem and where, not PyYAML's multi-line excerpt of the file
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path}: invalid YAML: {getattr(e, 'problem', None) or e}{where}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        beside = path.parent / str(base)
        # `base: demo` names the built-in preset when no such file sits beside this one
        parent = read_yaml(beside if beside.exists() or not _is_bare_name(str(base)) else str(base),
                           _seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def _is_bare_name(text: str) -> bool:
    """`demo` or `demo.yaml`: no directory part (a name a built-in preset may answer to)."""
    return bool(text) and os.sep not in text and "/" not in text and not text.startswith(("~", "."))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed with YAML scalar rules)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. loss.beta=0.2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a YAML preset (or the defaults when `path` is None) and apply dotted overrides (TRL / verl
    option names in `ALIASES` are accepted and logged)."""
    overrides, notes = expand_aliases(list(overrides))
    for note in notes:
        log.info(note)
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, overrides))


# ---------------------------------------------------------------------------
# Option names of TRL and verl
# ---------------------------------------------------------------------------

# Option names of TRL's GRPOConfig (and the TrainingArguments it extends) and of verl's ppo_trainer.yaml that
# mean one entrl key with the same value convention. As command-line overrides they are rewritten to that key
# (with a one-line note). A second target is set too unless the same command line sets it: TRL's `epsilon`
# and verl's `clip_ratio` clip both sides unless the upper bound is given. Options whose values mean
# something else (verl's top_k=-1, save_freq=-1; TRL's loss_type, scale_rewards) are only in the README table.
ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    # TRL GRPOConfig / TrainingArguments
    "num_generations": (("rollout.n",), "TRL"),
    "max_completion_length": (("rollout.max_new_tokens",), "TRL"),
    "max_prompt_length": (("data.max_prompt_len",), "TRL"),
    "temperature": (("rollout.temperature",), "TRL"),
    "top_p": (("rollout.top_p",), "TRL"),
    "top_k": (("rollout.top_k",), "TRL"),
    "beta": (("loss.kl_coef",), "TRL"),
    "epsilon": (("loss.params.clip_low", "loss.params.clip_high"), "TRL"),
    "epsilon_high": (("loss.params.clip_high",), "TRL"),
    "num_iterations": (("train.ppo_epochs",), "TRL"),
    "learning_rate": (("optim.lr",), "TRL"),
    "weight_decay": (("optim.weight_decay",), "TRL"),
    "max_grad_norm": (("optim.grad_clip",), "TRL"),
    "adam_beta1": (("optim.b1",), "TRL"),
    "adam_beta2": (("optim.b2",), "TRL"),
    "warmup_steps": (("optim.warmup_steps",), "TRL"),
    "lr_scheduler_type": (("optim.schedule",), "TRL"),
    "max_steps": (("train.steps",), "TRL"),
    "seed": (("train.seed",), "TRL"),
    "output_dir": (("train.out_dir",), "TRL"),
    "save_steps": (("train.checkpoint_every",), "TRL"),
    "save_total_limit": (("train.keep_checkpoints",), "TRL"),
    "logging_steps": (("train.log_every",), "TRL"),
    "eval_steps": (("train.eval_every",), "TRL"),
    "gradient_checkpointing": (("model.remat",), "TRL"),
    "run_name": (("train.run_name",), "TRL"),
    "reward_weights": (("reward.weights",), "TRL"),
    # TRL's ModelConfig (its scripts' --lora_r ...; PEFT's LoraConfig r / lora_alpha / target_modules)
    "lora_r": (("model.lora_rank",), "TRL"),
    "lora_alpha": (("model.lora_alpha",), "TRL"),
    "lora_target_modules": (("model.lora_targets",), "TRL"),
    # verl ppo_trainer.yaml
    "data.train_files": (("data.train",), "verl"),
    "data.prompt_key": (("data.problem_key",), "verl"),
    "data.max_prompt_length": (("data.max_prompt_len",), "verl"),
    "data.max_response_length": (("rollout.max_new_tokens",), "verl"),
    "data.train_batch_size": (("train.prompts_per_step",), "verl"),
    "actor_rollout_ref.model.path": (("model.path",), "verl"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": (("model.remat",), "verl"),
    "actor_rollout_ref.model.lora_rank": (("model.lora_rank",), "verl"),
    "actor_rollout_ref.model.lora_alpha": (("model.lora_alpha",), "verl"),
    "actor_rollout_ref.model.target_modules": (("model.lora_targets",), "verl"),
    "actor_rollout_ref.rollout.n": (("rollout.n",), "verl"),
    "actor_rollout_ref.rollout.temperature": (("rollout.temperature",), "verl"),
    "actor_rollout_ref.rollout.top_p": (("rollout.top_p",), "verl"),
    "actor_rollout_ref.rollout.response_length": (("rollout.max_new_tokens",), "verl"),
    "actor_rollout_ref.actor.ppo_mini_batch_size": (("train.minibatch_prompts",), "verl"),
    "actor_rollout_ref.actor.ppo_epochs": (("train.ppo_epochs",), "verl"),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": (("train.microbatch_per_shard",), "verl"),
    "actor_rollout_ref.actor.clip_ratio": (("loss.params.clip_low", "loss.params.clip_high"), "verl"),
    "actor_rollout_ref.actor.clip_ratio_low": (("loss.params.clip_low",), "verl"),
    "actor_rollout_ref.actor.clip_ratio_high": (("loss.params.clip_high",), "verl"),
    "actor_rollout_ref.actor.loss_agg_mode": (("loss.agg",), "verl"),
    "actor_rollout_ref.actor.kl_loss_coef": (("loss.kl_coef",), "verl"),
    "actor_rollout_ref.actor.optim.lr": (("optim.lr",), "verl"),
    "actor_rollout_ref.actor.optim.weight_decay": (("optim.weight_decay",), "verl"),
    "actor_rollout_ref.actor.optim.clip_grad": (("optim.grad_clip",), "verl"),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": (("optim.warmup_steps",), "verl"),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": (("optim.schedule",), "verl"),
    "trainer.total_training_steps": (("train.steps",), "verl"),
    "trainer.default_local_dir": (("train.out_dir",), "verl"),
    "trainer.project_name": (("train.wandb_project",), "verl"),
    "trainer.experiment_name": (("train.run_name",), "verl"),
    "algorithm.filter_groups.enable": (("train.only_mixed_groups",), "verl"),
    "data.val_files": (("val.data",), "verl"),
    "trainer.val_before_train": (("val.before_training",), "verl"),
    "actor_rollout_ref.rollout.val_kwargs.n": (("val.n",), "verl"),
    "actor_rollout_ref.rollout.val_kwargs.temperature": (("val.temperature",), "verl"),
    "actor_rollout_ref.rollout.val_kwargs.top_p": (("val.top_p",), "verl"),
}

_ALIAS_HINTS = {
    "beta": " (SENT's and KL-Cov's own beta is loss.params.beta)",
    "algorithm.filter_groups.enable": " (entrl updates on the mixed groups only; it does not sample more to refill "
                                      "the batch)",
}


def expand_aliases(overrides: list[str]) -> tuple[list[str], list[str]]:
    """TRL / verl option names in `overrides` rewritten to entrl keys (see `ALIASES`); returns the
    overrides and one note per alias used."""
    keyed = [(text.split("=", 1)[0].strip(), text) for text in overrides]
    primary = [ALIASES[k][0][0] if k in ALIASES else k for k, _ in keyed]
    for (key, _), target in zip(keyed, primary):
        others = [k for (k, _), p in zip(keyed, primary) if p == target and k != key]
        if key in ALIASES and others:  # which one wins would be a matter of order: refuse
            raise ConfigError(f"{key} is {ALIASES[key][1]}'s name for {target}, also given as {others[0]}: give one")
    explicit = set(primary)
    out, notes = [], []
    for key, text in keyed:
        if key not in ALIASES or "=" not in text:
            out.append(text)
            continue
        targets, origin = ALIASES[key]
        value = text.split("=", 1)[1]
        flag = {"true": True, "false": False}.get(value.strip().lower())
        if flag is not None and targets[0] in VALUE_MAPS:  # gradient_checkpointing=true is model.remat=full
            value = VALUE_MAPS[targets[0]][flag]
        used = [targets[0]] + [t for t in targets[1:] if t not in explicit]
        out += [f"{t}={value}" for t in used]
        notes.append(f"{key} is {origin}'s name: using {' and '.join(f'{t}={value}' for t in used)}"
                     f"{_ALIAS_HINTS.get(key, '')}")
    return out, notes


def replace(cfg: Any, **changes) -> Any:
    """dataclasses.replace that accepts dotted keys: replace(cfg, **{"train.steps": 3})."""
    nested: dict[str, dict] = {}
    flat = {}
    for k, v in changes.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def docs_table(cls: type = RunConfig) -> str:
    """Markdown reference of every config field, generated from the dataclasses' comments."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        sect = typing.get_type_hints(cls)[f.name]
        comments = _field_comments(sect)
        for sf in dataclasses.fields(sect):
            default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()
            lines.append(f"| `{f.name}.{sf.name}` | `{default!r}` | {comments.get(sf.name, '')} |")
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    out = {}
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", "def", "raise", "if", "_")):
            name = s.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = _named_lists(s.split("#", 1)[1].strip()).replace("|", "\\|")
    return out


def _named_lists(comment: str) -> str:
    """A field comment with `{losses}`, `{agg_modes}`, `{kl_kinds}` replaced by the registered names."""
    lists = {"losses": LOSSES, "agg_modes": AGG_MODES, "kl_kinds": KL_KINDS}
    for key, names in lists.items():
        comment = comment.replace("{" + key + "}", " | ".join(names))
    return comment
