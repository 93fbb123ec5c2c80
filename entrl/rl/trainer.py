"""The host loop of RL training: batch -> rollout -> reward -> advantage -> update.

Design decisions:
- The loop is short and delegates: sampling (`entrl.sampling`), rewards
  (`entrl.rewards`), advantages and losses (`entrl.rl`), the jitted update
  (`entrl.rl.step`), checkpoints (`entrl.checkpoint`), metrics (`entrl.metrics`).
  `setup()` builds everything from a `RunConfig`; `run()` iterates.
- Reproducibility: the RNG of step k is `fold_in(key(seed), k)`, so a resumed
  run draws the same samples as an uninterrupted one; the data iterator's state,
  params, optimizer state and step are restored from the checkpoint.
- The reference policy is the initial policy (the model at `model.path`, or the
  seeded random init of the built-in demo model); it is rebuilt, not stored,
  on resume. It is skipped entirely when `loss.kl_coef == 0`. Under LoRA it is
  the base with the initial (B = 0, i.e. disabled) adapters, sharing the
  base's arrays; checkpoints then hold only the adapters and their optimizer
  state (`entrl.models.lora`).
- Curriculum stage boundaries (`train.stage_boundary`): `continue` keeps the
  optimizer and the reference (one run over all stages); `reset_optimizer`
  starts a fresh optimizer; `restart` is the released two-stage recipe, where
  stage 2 is a new run from the stage-1 policy: fresh optimizer, and the
  current policy becomes the reference. That reference is no longer the
  initial model, so it is written once to `<out_dir>/reference/stage<k>/`
  when stage k starts (before any checkpoint of stage k exists) and read back
  when a run resumes in stage k; earlier stages' copies stay, so a fallback to
  an older checkpoint finds its reference too.
- Evaluation during training (`train.eval_every`, set `val`): n samples per
  problem of a fixed problem set (the task's held-out split, a benchmark or a
  file), logged as `eval/pass@k`, `eval/avg@k`; the sampling key is the same
  at every evaluation, so differences between steps are the policy's, not
  the draw's. With `val.before_training` the initial policy is evaluated at
  step 0 of a fresh run.
- Multi-host: every process runs this same loop. Prompt batches are
  process-local and assembled into global arrays. Each host decodes and
  verifies only the responses its own devices hold (`entrl.multihost.local_rows`;
  the host CPUs are the verifier), then the per-row rewards are gathered so
  every host computes the same advantages. Token statistics for the metrics are
  reduced on the devices; nothing [rows, length]-sized is fetched to a host.
- Micro- and mini-batches take each data shard's block of rows
  (`entrl.token_stats.micro_rows`), rollouts of several sampler calls are joined
  shard-wise: rows never move between devices inside a step.
- Non-finite steps are skipped inside the jitted update; the host counts them
  and stops the run after `train.max_nonfinite_steps` in a row. A checkpoint
  written at a skipped step holds the previous step's state (finite: the
  checkpoint writer re-checks) and the streak of skipped steps, so a resumed
  run stops where the straight run would.
- SIGTERM (preemption) sets a flag; the loop finishes the current step, writes
  a checkpoint and returns with `preempted` set. The run did not finish, so
  `train_from_config` writes no `policy/` and raises `Preempted` (the CLI
  exits 143 = 128 + SIGTERM, the shell's code for a SIGTERM'd process).
- The run directory is locked for as long as the Trainer lives
  (`entrl.rundir.RunDir`, taken by `train_from_config` before setup, or by
  the Trainer itself when built directly). A fresh start (`run(resume=False)`)
  in a directory holding checkpoints is refused: it could never save over them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from entrl import config as C
from entrl.checkpoint import CheckpointManager, TreeIntegrityError, one_line_error, restore_tree, save_tree
from entrl.data.curriculum import Curriculum
from entrl.data.pipeline import PromptPipeline
from entrl.data.sources import Record
from entrl.evaluation import evaluate_prompts
from entrl.metrics import MetricsLogger
from entrl.models import lora
from entrl.multihost import allgather_local, gather, gather_rows, local_rows, to_device
from entrl.progress import progress_bar
from entrl.rl.advantages import grpo_advantages
from entrl.rl.step import StepSettings, balanced_shard_order, length_order, make_optimizer, make_update_fn
from entrl.rl.summary import log_startup_summary, planned_steps
from entrl.rundir import RunDir
from entrl.sampling import FINISH_LENGTH, build_sampler, val_batch_prompts, val_settings
from entrl.seams import Reward, RolloutBackend
from entrl.semantic_entropy import batch_prompt_stats
from entrl.sharding import batch_sharding, data_shards, shard_batch
from entrl.token_stats import compute_logprobs, micro_rows
from entrl.tokenizer import Tokenizer

log = logging.getLogger("entrl.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class Components:
    """Everything `run()` needs, built by `setup()` (tests may pass their own pieces)."""

    cfg: C.RunConfig
    mesh: Mesh | None  # None: one device
    graphdef: nnx.GraphDef  # the policy's structure (static under jit)
    params: nnx.State  # the policy's master weights, on the mesh
    ref_params: nnx.State | None  # the frozen reference policy in the compute dtype (None: loss.kl_coef = 0)
    tokenizer: Tokenizer
    records: list[Record]  # indexed by PromptBatch.indices
    prompt_tokens: list[list[int]]  # token ids of each record's prompt
    curriculum: Curriculum
    pipeline: PromptPipeline
    sampler: RolloutBackend
    verifier: Reward
    heldout: tuple | None = None  # (prompt_tokens, records) of the `val` set, evaluated every train.eval_every steps


# ---------------------------------------------------------------------------
# Pure-ish helpers of one RL step (host side)
# ---------------------------------------------------------------------------


def decode_responses(tokenizer, tokens_NxL: np.ndarray, mask_NxL: np.ndarray) -> list[str]:
    out = []
    for toks, m in zip(tokens_NxL, mask_NxL):
        out.append(tokenizer.decode([int(t) for t in toks[: int(m.sum())]], skip_special_tokens=True))
    return out


def group_stats(rewards: np.ndarray, n: int) -> dict:
    groups = rewards.reshape(-1, n)
    zero_var = (groups.max(1) == groups.min(1)).mean()
    return {"zero_var_group_frac": float(zero_var)}


def rollout_semantic_entropy(answers: list, n: int, verifier=None, *, no_answer: str = "singleton") -> np.ndarray:
    """[prompts] count-based semantic entropy of each prompt of a step, from its own n rollouts (rows of a
    prompt contiguous). Their mean is the `batch_semantic_entropy` metric (docs/method.md, "What to log"),
    and `curriculum.refresh` re-ranks the prompts by them."""
    groups = [answers[i:i + n] for i in range(0, len(answers), n)]
    hook = verifier.equivalent_pairs if verifier is not None else None
    return np.asarray([s["se"] for s in batch_prompt_stats(groups, pairs_equivalent=hook, no_answer=no_answer)],
                      np.float64)


def run_optimizer(cfg: C.RunConfig, steps: int = 0):
    """The run's AdamW, its schedule over the optimizer steps of `steps` RL steps (0 = train.steps; the Trainer
    passes the curriculum's count when train.steps is 0, else a decaying schedule would end after one step)."""
    total_opt_steps = max(steps or cfg.train.steps, 1) * cfg.train.ppo_epochs * (
        cfg.train.prompts_per_step // cfg.train.minibatch_prompts)
    o = cfg.optim
    return make_optimizer(lr=o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                          schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=total_opt_steps)


def reference_params(cfg: C.RunConfig, params):
    """The frozen reference policy: a copy of `params` in the compute dtype (bf16 under bf16 compute: half the
    bytes of float32 masters, and the same values the policy's forward computes with); None without KL.

    Under LoRA only the adapters are copied and the base's arrays are shared (the update never donates
    them): at the start the adapters are B = 0, so this is the base with its adapters disabled.
    """
    if cfg.loss.kl_coef == 0:
        return None
    if lora.has_adapters(params):
        adapters, base = lora.split(params)
        return lora.join(jax.jit(lambda a: jax.tree.map(jnp.copy, a))(adapters), base)
    dtype = jnp.dtype(cfg.model.dtype)
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x.copy(), p))(params)


def opt_state_shardings(optimizer, params, mesh):
    """Shardings of `optimizer.init(params)`: Adam moments laid out as their params, counters replicated.
    `params` may be abstract (ShapeDtypeStructs with shardings). Without explicit shardings jit would put
    the data-independent zeros on device 0."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params), param_sh,
                                 transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def step_settings(cfg: C.RunConfig, shards: int = 1) -> StepSettings:
    """The update's static settings; `shards` = data shards of the mesh (`entrl.sharding.data_shards`)."""
    rows = cfg.train.minibatch_prompts * cfg.rollout.n
    scope, scope_seqs = C.selection_scope(cfg, shards)
    return StepSettings(
        loss_name=cfg.loss.name,
        loss_params=tuple(sorted(cfg.loss.params.items())),
        agg=cfg.loss.agg,
        scope=scope,
        scope_seqs=scope_seqs,
        kl_coef=cfg.loss.kl_coef,
        kl_estimator=cfg.loss.kl_estimator,
        temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0,
        num_micro=rows // (shards * C.microbatch_per_shard(cfg, shards)),
        shards=shards,
        length_buckets=cfg.train.length_buckets,
    )


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------


class Trainer:
    """Runs `cfg` to completion (or `max_steps`), checkpointing and logging as it goes."""

    def __init__(self, comps: Components, run_dir=None):
        self.comps = comps
        cfg = comps.cfg
        self.cfg = cfg
        # A caller that built the components itself gets the lock here (train_from_config passes its own).
        self._own_run_dir = run_dir is None
        self.run_dir = run_dir or RunDir.open(cfg.train.out_dir, resume=True, config=C.to_dict(cfg), adopt=True)
        self.out = self.run_dir.path
        self.settings = step_settings(cfg, data_shards(comps.mesh))
        self.optimizer = run_optimizer(cfg, cfg.train.steps or comps.pipeline.total_steps)
        self.params = comps.params
        self.opt_state = self._init_opt(self.params)
        shardings = None
        if comps.mesh is not None:
            shardings = (jax.tree.map(lambda x: x.sharding, self.params),
                         jax.tree.map(lambda x: x.sharding, self.opt_state))
        self.update = make_update_fn(comps.graphdef, self.optimizer, self.settings, state_shardings=shardings)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.planned_steps = planned_steps(cfg, comps.pipeline)  # train.steps, or the curriculum's when 0
        t = cfg.train
        self.logger = MetricsLogger(self.out, console=jax.process_index() == 0,
                                    tensorboard=t.tensorboard and jax.process_index() == 0,
                                    wandb=t.wandb and jax.process_index() == 0, wandb_project=t.wandb_project,
                                    wandb_entity=t.wandb_entity, run_name=t.run_name, config=C.to_dict(cfg),
                                    total_steps=self.planned_steps, log_every=t.log_every)
        self.step = 0
        self.stage = 0
        self.consecutive_nonfinite = 0
        self.key = jax.random.key(cfg.train.seed)
        self._stop = False
        self.preempted = False  # set when run() stopped on SIGTERM
        self._eval_sampler = None
        self._samples: list[dict] = []  # sample completions of the current step, when due (`_score`)
        self.history: list[dict] = []

    # -- state ---------------------------------------------------------------

    def _init_opt(self, params):
        """Optimizer state of the trained params (all, or the LoRA adapters), laid out like them (see
        `opt_state_shardings`)."""
        params = lora.trainable(params)
        if self.comps.mesh is None:
            return jax.jit(self.optimizer.init)(params)
        return jax.jit(self.optimizer.init, out_shardings=opt_state_shardings(self.optimizer, params, self.comps.mesh))(params)

    def restore(self) -> bool:
        """Resume from the latest good checkpoint, if any. Returns True when resumed.

        Memory: the fresh optimizer state (zeros) is dropped before the checkpoint's arrives, and the
        starting weights are freed once the checkpoint's replace them, so a resumed run holds one copy of
        its state, as a fresh one does (the weights are held twice only while the checkpoint is read)."""
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
        trained, frozen = lora.split(self.params)  # checkpoints hold the trained part (the adapters under LoRA)
        opt_target = abstract(self.opt_state)
        if self.ckpt.latest_step() is not None:  # the listing every process sees: all drop it, or none
            self.opt_state = None
        try:
            restored = self.ckpt.restore_latest(params_target=abstract(trained), opt_state_target=opt_target)
        except ValueError as e:  # checkpoints of another model, optimizer or process count than this run's
            raise C.ConfigError(f"{e}; resume with the settings the run started with (model.*, model.lora_* "
                                "included, and the process count)") from None
        if restored is None:
            if self.opt_state is None:  # no checkpoint could be read after all: a fresh start
                self.opt_state = self._init_opt(self.params)
            return False
        for x in jax.tree.leaves(trained):  # the starting weights (also comps.params): not needed any more
            x.delete()
        self.params, self.opt_state = lora.join(restored.params, frozen), restored.opt_state
        self.comps.params = self.params
        self.step = int(restored.meta["step"])
        self.stage = int(restored.meta.get("stage", 0))
        self.consecutive_nonfinite = int(restored.meta.get("nonfinite_streak", 0))
        if self._restarts_reference() and self.stage > 0:
            self.comps.ref_params = self._restore_reference(self.stage)
        self.comps.pipeline.set_state(restored.data_state)
        self.logger.truncate_after(self.step)
        log.info("resumed from step %d (stage %d)", self.step, self.stage)
        return True

    def save(self, force: bool = False):
        meta = {"step": self.step, "stage": self.stage, "nonfinite_streak": self.consecutive_nonfinite,
                "config": C.to_dict(self.cfg)}
        self.ckpt.save(self.step, params=lora.trainable(self.params), opt_state=self.opt_state, meta=meta,
                       data_state=self.comps.pipeline.get_state(), force=force)

    # -- one RL step: ROLLOUT, SCORE, LOG-PROBS, UPDATE, METRICS ---------------

    def rl_step(self, batch) -> dict:
        rng = jax.random.fold_in(self.key, self.step)
        rng_sample, rng_loss = jax.random.split(rng)
        t0 = time.perf_counter()
        roll = self._rollout(batch, rng_sample)
        t_roll = time.perf_counter()
        scored = self._score(batch, roll)
        scored["se"] = self._rollout_se(roll, scored)
        t_rew = time.perf_counter()
        full, stats = self._logprobs(roll, scored)
        t_lp = time.perf_counter()
        upd = self._update(full, rng_loss)
        t_upd = time.perf_counter()
        metrics = self._metrics(batch, roll, scored, stats, upd)
        metrics.update({"time/rollout": t_roll - t0, "time/reward": t_rew - t_roll, "time/logprob": t_lp - t_rew,
                        "time/update": t_upd - t_lp, "time/step": t_upd - t0,
                        "tokens_per_s": stats["tokens"] / max(t_roll - t0, 1e-9)})
        return metrics

    def _rollout(self, batch, rng) -> dict:
        """rollout.n responses per prompt: one sampler call on the step's prompts.

        With `rollout.slots` the sampler decodes at most that many rows at once, refilling each data
        shard's slots from its own prompts (`entrl.sampling`). Returns the rollout's arrays as global
        arrays of all R rows in the step's row order: prompt-major (rows of a prompt contiguous), the
        prompts in process order, so each data shard's rows are contiguous.
        """
        comps = self.comps
        ids, pmask = batch.input_ids, batch.attention_mask
        if comps.mesh is not None:
            ids, pmask = shard_batch(ids, comps.mesh), shard_batch(pmask, comps.mesh)
        roll = comps.sampler.sample((comps.graphdef, self.params), ids, pmask, rng)
        out = {f.name: getattr(roll, f.name) for f in dataclasses.fields(roll)}
        out["row_prompt"] = np.repeat(allgather_local(np.asarray(batch.indices)), self.cfg.rollout.n)
        return out

    def _score(self, batch, roll: dict) -> dict:
        """Rewards and GRPO advantages (host side). Each process decodes and verifies only the rows its
        own devices hold; the per-row results are then gathered, so every process has all of them."""
        cfg, comps = self.cfg, self.comps
        n = cfg.rollout.n
        rows, tokens = local_rows(roll["tokens"])
        _, mask = local_rows(roll["mask"])
        texts = decode_responses(comps.tokenizer, tokens, mask)
        prompts = [int(roll["row_prompt"][r]) for r in rows]
        res = comps.verifier.score_rewards(texts, [comps.records[p].answer for p in prompts], self._record_rows(prompts))
        every = cfg.train.log_samples_every
        if every and (self.step + 1) % every == 0 and jax.process_index() == 0:
            self._samples = self._sample_records(prompts, texts, res)
        full = gather_rows(rows, {"reward": [float(x) for x in res.rewards], "correct": [bool(x) for x in res.correct],
                                  "answer": list(res.answers), "status": list(res.status),
                                  **{f"term/{k}": [float(x) for x in v] for k, v in res.components.items()},
                                  **{f"failed/{k}": [bool(x) for x in v] for k, v in res.failed.items()}},
                           total=len(roll["row_prompt"]))
        rewards = np.asarray(full["reward"], np.float32)
        adv = np.asarray(grpo_advantages(jnp.asarray(rewards), n, normalize_std=cfg.loss.advantage == "grpo"))
        mixed = np.ones(len(rewards), np.float32)
        if cfg.train.only_mixed_groups:
            mixed = np.repeat(rewards.reshape(-1, n).std(1) > 0, n).astype(np.float32)
        return {"rewards": rewards, "correct": np.asarray(full["correct"], bool), "answers": full["answer"],
                "status": full["status"], "advantages": adv, "mixed": mixed, "graded": res.graded,
                "terms": {k: np.asarray(full[f"term/{k}"], np.float32) for k in res.components},
                "failed": {k: np.asarray(full[f"failed/{k}"], bool) for k in res.failed}}

    def _rollout_se(self, roll: dict, scored: dict) -> np.ndarray:
        """Each prompt's SE from this step's rollouts; with `curriculum.refresh`, reported to the pipeline
        (process 0's values on every process: the verifier's timeouts could make processes disagree, and
        their curricula must not)."""
        cfg = self.cfg
        se = rollout_semantic_entropy(scored["answers"], cfg.rollout.n, self.comps.verifier,
                                      no_answer=cfg.curriculum.se_no_answer)
        if cfg.curriculum.refresh:
            ranked = se.astype(np.float32)  # what a broadcast carries (no x64): alike under any process count
            if jax.process_count() > 1:
                ranked = np.asarray(multihost_utils.broadcast_one_to_all(ranked))
            self.comps.pipeline.observe_se(roll["row_prompt"][::cfg.rollout.n], ranked.astype(np.float64))
        return se

    def _record_rows(self, prompts: list[int]) -> list[dict]:
        """Each row's prompt record as the reward functions see it: the row as read (id, prompt and answer
        under the dataset's own keys, plus every other column)."""
        d, rows = self.cfg.data, {}
        for p in set(prompts):
            rows[p] = self.comps.records[p].to_row(id_key=d.id_key, problem_key=d.problem_key, answer_key=d.answer_key)
        return [rows[p] for p in prompts]

    def _sample_records(self, prompts: list[int], texts: list[str], res) -> list[dict]:
        """The first response of up to `SAMPLES_LOGGED` prompts among this process's rows, for rollouts.jsonl."""
        out, seen = [], set()
        for i, p in enumerate(prompts):
            if p in seen or len(out) == SAMPLES_LOGGED:
                continue
            seen.add(p)
            rec = self.comps.records[p]
            out.append({"id": rec.id, "reward": float(res.rewards[i]), "correct": bool(res.correct[i]),
                        "status": res.status[i], "answer": res.answers[i], "reference": rec.answer,
                        **({"rewards": {k: float(v[i]) for k, v in res.components.items()}} if res.components else {}),
                        "prompt": self.comps.tokenizer.decode([int(t) for t in self.comps.prompt_tokens[p]],
                                                          skip_special_tokens=False),
                        "response": texts[i]})
        return out

    def _logprobs(self, roll: dict, scored: dict) -> tuple[dict, dict]:
        """The update's batch: old (and reference) log-probs and entropies of every response token, plus
        the step's token statistics (computed on the devices: nothing [rows, length]-sized is fetched).

        Under the global selection scope with length buckets, each shard's rows of each mini-batch are
        put in order of length first (`entrl.rl.step.length_order`: rows stay on their shard and in
        their mini-batch, whose loss does not depend on row order), so most micro-batches run short.
        Under the micro-batch scope with several data shards, the rows are dealt to the shards in
        length-balanced sets first, each in rollout order (`entrl.rl.step.balanced_shard_order`, verl's
        `balance_batch`): which sequences share a selection scope is then the released runs' kind.
        """
        cfg, comps = self.cfg, self.comps
        sh = self.settings.shards
        rows = roll["tokens"].shape[0]
        keys = ("prompt_ids", "prompt_mask", "tokens", "mask", "logprobs", "lengths", "finish_code")
        arrays = {k: roll[k] for k in keys}
        mixed, advantages = scored["mixed"], scored["advantages"]
        if self.settings.scope == "global" and self.settings.length_buckets > 1:
            n_mini = rows // (cfg.train.minibatch_prompts * cfg.rollout.n)
            order = length_order(np.asarray(gather(roll["lengths"])), sh, n_mini)
            local = order.reshape(sh, -1) - (np.arange(sh) * (rows // sh))[:, None]
            arrays = _shard_permute(arrays, to_device(local.astype(np.int32), comps.mesh))
            mixed, advantages = mixed[order], advantages[order]
        elif self.settings.scope == "microbatch" and sh > 1:
            seq_lengths = roll["lengths"] + jnp.sum(roll["prompt_mask"], axis=1, dtype=jnp.int32)
            order = balanced_shard_order(np.asarray(gather(seq_lengths)), sh)
            order_R = jax.device_put(order.astype(np.int32), NamedSharding(comps.mesh, PartitionSpec()))  # alike everywhere
            arrays = _rows_permute(arrays, order_R, comps.mesh)
            mixed, advantages = mixed[order], advantages[order]
        full = {
            "prompt_ids": arrays["prompt_ids"],
            "prompt_mask": arrays["prompt_mask"],
            "resp_ids": arrays["tokens"],
            "resp_len": arrays["lengths"],
            "resp_mask": _masked(arrays["mask"], to_device(mixed, comps.mesh)),
            "advantages": to_device(advantages, comps.mesh),
        }
        stats = dict(temperature=self.settings.temperature, chunk_size=self.settings.chunk_size,
                     num_micro=rows // (sh * C.microbatch_per_shard(cfg, sh)), shards=sh,
                     length_buckets=self.settings.length_buckets)
        if cfg.rollout.reuse_sampler_logprobs:
            old_logp = jnp.asarray(arrays["logprobs"])
            _, entropy = compute_logprobs(comps.graphdef, self.params, full, **stats)
        else:
            old_logp, entropy = compute_logprobs(comps.graphdef, self.params, full, **stats)
        full["old_logp"] = old_logp
        if cfg.loss.kl_coef > 0:
            full["ref_logp"], _ = compute_logprobs(comps.graphdef, comps.ref_params, full, **stats)
        else:
            full["ref_logp"] = jnp.zeros_like(old_logp)
        token_stats = _token_metrics(entropy, old_logp, arrays["logprobs"], arrays["mask"], arrays["finish_code"])
        return full, {k: float(gather(v)) for k, v in token_stats.items()}

    def _update(self, full: dict, rng) -> dict:
        """ppo_epochs passes over the step's mini-batches (each shard's j-th block of rows), one optimizer
        step each; returns the update metrics averaged over them."""
        cfg = self.cfg
        total = full["resp_ids"].shape[0]
        n_mini = total // (cfg.train.minibatch_prompts * cfg.rollout.n)
        metrics = []
        for epoch in range(cfg.train.ppo_epochs):
            for j in range(n_mini):
                mb = _minibatch(full, j, n_mini, self.settings.shards)
                # one key per optimizer step (Clip-Cov's draw differs across PPO epochs too)
                self.params, self.opt_state, m = self.update(self.params, self.opt_state, mb,
                                                             jax.random.fold_in(rng, epoch * n_mini + j))
                metrics.append(m)
        metrics = [{k: float(gather(v)) for k, v in m.items()} for m in metrics]
        out = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        out["skipped_nonfinite"] = max(m["skipped_nonfinite"] for m in metrics)
        return out

    def _metrics(self, batch, roll: dict, scored: dict, stats: dict, upd: dict) -> dict:
        """The entropy-collapse diagnostics of the step (docs/method.md, "What to log")."""
        n = self.cfg.rollout.n
        rewards, status = scored["rewards"], scored["status"]
        return {
            "reward": float(rewards.mean()),
            **({"accuracy": float(np.mean(scored["correct"]))} if scored["graded"] else {}),  # the math term's
            **{f"reward/{k}": float(v.mean()) for k, v in scored["terms"].items()},
            **{f"reward_failures/{k}": float(v.sum()) for k, v in scored["failed"].items()},
            "entropy": stats["entropy"],
            "response_length": stats["response_length"],
            "truncation_rate": stats["truncation_rate"],
            "sampler_logprob_gap": stats["sampler_logprob_gap"],
            "batch_semantic_entropy": float(scored["se"].mean()) if scored["se"].size else 0.0,
            "stage": float(batch.stage),
            "epoch": float(batch.epoch),
            "no_answer_frac": status.count("no_answer") / max(len(status), 1),
            "verify_timeouts": float(status.count("timeout")),
            **group_stats(rewards, n),
            **{k if k in _PASS_THROUGH else f"update/{k}": v for k, v in upd.items()},
        }

    # -- the loop ------------------------------------------------------------

    def run(self, *, max_steps: int | None = None, resume: bool = True) -> list[dict]:
        cfg = self.cfg
        resumed = resume and self.restore()
        if resumed:
            self.run_dir.note_resumed(self.step)
        if not resumed:
            old = self.ckpt.latest_step()
            if old is not None:
                raise C.ConfigError(f"{self.ckpt.directory} already holds checkpoints up to step {old}: a fresh "
                                    "run cannot save over them; resume, or start over with --overwrite")
            self.logger.truncate_after(-1)  # every metric line of a run that never checkpointed (its step 0 too)
        self._log_summary()
        if not resumed and self._evaluates() and cfg.val.before_training:  # the initial policy's point
            metrics = self.evaluate()
            if metrics:
                self.logger.log(self.step, metrics)
                self.history.append({"step": self.step, **metrics})
        prev = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        shown = contextlib.ExitStack()  # the progress bar (closed in `finally`)
        bar = shown.enter_context(progress_bar(self.planned_steps, initial=self.step, desc="train", unit="step",
                                               setting=cfg.train.progress))
        try:
            it = iter(self.comps.pipeline)
            ran = 0
            while True:
                if cfg.train.steps and self.step >= cfg.train.steps:
                    break
                if max_steps is not None and ran >= max_steps:
                    break
                if self._should_stop():
                    self.preempted = True
                    break
                try:
                    batch = next(it)
                except StopIteration:
                    log.info("curriculum exhausted after %d steps", self.step)
                    break
                if batch.stage != self.stage:
                    self._enter_stage(batch.stage)
                metrics = self.rl_step(batch)
                self.step += 1
                ran += 1
                skipped = metrics["skipped_nonfinite"] > 0
                self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0
                if skipped:
                    log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)",
                                self.step, self.consecutive_nonfinite)
                elif self._evaluates() and self.step % cfg.train.eval_every == 0:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                self._log_progress(metrics, bar)
                self.history.append({"step": self.step, **metrics})
                if self.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{self.consecutive_nonfinite} consecutive steps (up to step {self.step}) had a non-finite "
                        "loss or gradient and were skipped; lower optim.lr, check the data, or raise "
                        "train.max_nonfinite_steps")
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save()
            self.save(force=True)
            self.ckpt.wait()
        finally:
            shown.close()
            if prev is not None:
                signal.signal(signal.SIGTERM, prev)
        return self.history

    def _log_summary(self) -> None:
        """The start-up summary (`entrl.rl.summary`), once per `run`, from process 0."""
        log_startup_summary(log, self.cfg, verifier=self.comps.verifier, params=self.params, mesh=self.comps.mesh,
                            pipeline=self.comps.pipeline, settings=self.settings, out_dir=self.out, step=self.step)

    def _log_progress(self, metrics: dict, bar) -> None:
        """After a step's metrics: its sample completions when due (rollouts.jsonl) and the progress bar."""
        if self._samples:
            self.logger.log_samples(self.step, self._samples)
            self._samples = []
        bar.update(1)
        bar.set_postfix({label: f"{metrics[k]:.3g}" for k, label in (("reward", "reward"), ("accuracy", "acc"),
                                                                      ("entropy", "entropy")) if k in metrics},
                        refresh=False)

    def close(self):
        try:
            self.ckpt.wait()
            self.ckpt.close()
            self.logger.close()
        finally:
            if self._own_run_dir:
                self.run_dir.close()

    def _evaluates(self) -> bool:
        return bool(self.cfg.train.eval_every and self.comps.heldout)

    def evaluate(self) -> dict:
        """pass@k and avg@k of the `val` set (`val.n` samples per problem), as `eval/...` metrics."""
        cfg, v = self.cfg, self.cfg.val
        if self._eval_sampler is None:  # the rollout sampler draws rollout.n per prompt; this one val.n
            self._eval_sampler = build_sampler(cfg, self.comps.tokenizer, self.comps.mesh, **val_settings(cfg))
        prompts, records = self.comps.heldout
        res = evaluate_prompts(self._eval_sampler, self.comps.graphdef, self.params, self.comps.tokenizer, prompts,
                               [r.answer for r in records], verifier=self.comps.verifier, n=v.n, ks=tuple(v.k),
                               seed=cfg.train.seed + 10_000, batch_prompts=val_batch_prompts(cfg),
                               buckets=tuple(cfg.rollout.prompt_buckets), with_entropy=v.entropy,
                               entropy_micro_per_shard=C.microbatch_per_shard(cfg, self.settings.shards),
                               progress=cfg.train.progress)
        out = {"eval/entropy": res["entropy"]} if v.entropy else {}
        for k in v.k:
            out[f"eval/pass@{k}"] = res[f"pass@{k}"]
            out[f"eval/avg@{k}"] = res[f"avg@{k}"]
        out["eval/response_length"] = res["response_length"]
        return out

    def _should_stop(self) -> bool:
        """The SIGTERM flag, agreed by every process (a signal may reach only some of them)."""
        if jax.process_count() == 1:
            return self._stop
        return bool(np.asarray(multihost_utils.process_allgather(np.asarray([self._stop]))).any())

    def _enter_stage(self, stage: int):
        boundary = self.cfg.train.stage_boundary
        log.info("entering curriculum stage %d at step %d (stage_boundary=%s)", stage, self.step, boundary)
        self.stage = stage
        if boundary in ("reset_optimizer", "restart"):  # the old state goes before the new one is made
            self.opt_state = None
            self.opt_state = self._init_opt(self.params)
        if self._restarts_reference():
            self.comps.ref_params = None
            self.comps.ref_params = reference_params(self.cfg, self.params)
            save_tree(self._reference_dir(stage), lora.trainable(self.comps.ref_params))  # the base is not stored

    def _restarts_reference(self) -> bool:
        return self.cfg.train.stage_boundary == "restart" and self.comps.ref_params is not None

    def _reference_dir(self, stage: int):
        return self.out / "reference" / f"stage{stage}"

    def _restore_reference(self, stage: int):
        """The reference of a `restart` stage, written when the stage began."""
        path = self._reference_dir(stage)
        if not path.exists():
            raise C.ConfigError(f"resuming in curriculum stage {stage} with train.stage_boundary=restart needs the "
                                f"reference policy written when the stage began, and {path} is missing")
        stored, frozen = lora.split(self.comps.ref_params)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            stored)
        try:
            return lora.join(restore_tree(path, like), frozen)
        except TreeIntegrityError as e:  # no fallback: it is the policy at the stage's start, kept nowhere else
            raise C.ConfigError(f"the reference policy of stage {stage} in {path} is corrupt ({e}); restore it "
                                "from a backup, or start the run over (--overwrite)") from None
        except ValueError as e:
            raise C.ConfigError(f"the reference policy of stage {stage} in {path} does not fit this run's model "
                                f"({e})") from None
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for unreadable files
            raise C.ConfigError(f"the reference policy of stage {stage} in {path} cannot be read "
                                f"({one_line_error(e)})") from None

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: finishing the current step, writing a checkpoint and stopping")
        self._stop = True


SAMPLES_LOGGED = 4  # sample completions written to rollouts.jsonl per `train.log_samples_every` steps
_PASS_THROUGH = {"loss", "grad_norm", "clip_frac", "penalized_frac", "abs_logratio_mean", "cov_mean", "cov_max",
                 "ref_kl", "pg_loss", "policy_entropy", "skipped_nonfinite"}


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@jax.jit
def _masked(mask_RxL, keep_R):
    """The update's token mask: response tokens of the rows kept (e.g. only mixed groups)."""
    return mask_RxL.astype(jnp.float32) * keep_R[:, None]


@jax.jit
def _token_metrics(entropy_RxL, old_logp_RxL, sampler_logp_RxL, mask_RxL, finish_R) -> dict:
    """Per-step token statistics as replicated scalars: mean entropy over response tokens, the largest
    |recomputed - sampler| log-prob gap, token count, mean length, share of length-capped rows."""
    m = mask_RxL.astype(jnp.float32)
    count = m.sum()
    return {"entropy": (entropy_RxL * m).sum() / jnp.maximum(count, 1.0),
            "sampler_logprob_gap": jnp.max(jnp.abs(old_logp_RxL - sampler_logp_RxL) * m),
            "tokens": count, "response_length": m.sum(1).mean(),
            "truncation_rate": (finish_R == FINISH_LENGTH).astype(jnp.float32).mean()}


@jax.jit
def _shard_permute(arrays: dict, local_SxM) -> dict:
    """Each data shard's rows of every [R, ...] array reordered by its row of local indices [shards, R/shards]
    (a gather batched over the shards: no row leaves its device)."""
    shards = local_SxM.shape[0]

    def one(x):
        x_SxM = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
        return jax.vmap(lambda a, i: a[i])(x_SxM, local_SxM).reshape(x.shape)

    return {k: one(v) for k, v in arrays.items()}


@partial(jax.jit, static_argnums=(2,))
def _rows_permute(arrays: dict, order_R, mesh) -> dict:
    """Every [R, ...] array's rows in `order_R` (a global permutation: rows move between shards), split over
    the batch axes as before."""
    return {k: jax.lax.with_sharding_constraint(v[order_R], batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}


@partial(jax.jit, static_argnums=(2, 3))
def _minibatch(full: dict, j, n_mini: int, shards: int) -> dict:
    """Mini-batch j of the step: the j-th block of every shard's rows (`entrl.token_stats.micro_rows`)."""
    return {k: jax.lax.dynamic_index_in_dim(micro_rows(v, n_mini, shards), j, keepdims=False)
            for k, v in full.items()}
