"""The start-up summary of a training run: what is about to run, in a dozen lines, logged once.

Design decisions:
- Everything comes from the config and the built pieces (params, mesh, pipeline, the update's
  static settings), never from a device computation, so the summary costs nothing and shows
  before the first compile.
- Sizes are the step's upper bounds (every response at `rollout.max_new_tokens`); the memory
  view is `entrl plan`'s job.
"""

from __future__ import annotations

from typing import Any

import jax

from entrl import config as C
from entrl.models import lora
from entrl.rl.loss_specs import resolve_params


def planned_steps(cfg: C.RunConfig, pipeline) -> int:
    """RL steps the run will take: `train.steps`, or (0) all of the curriculum's, never more than it has."""
    total = int(pipeline.total_steps)
    return min(cfg.train.steps, total) if cfg.train.steps else total


def human_count(n: float) -> str:
    """1.78B, 19.1k: a count at its own scale."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def log_startup_summary(logger, cfg: C.RunConfig, *, verifier, **kwargs) -> None:
    """`startup_summary` logged from process 0, one record per line (each carries the log's time and level
    prefix). The reward terms come from `verifier` when it has them (`entrl.rewards.Verifier.rewards`), else
    from the config; `kwargs` go to `startup_summary`."""
    if jax.process_index() != 0:
        return
    rewards = getattr(verifier, "rewards", None)
    terms = [(t.spec, t.weight) for t in rewards] if rewards is not None else None
    for line in startup_summary(cfg, reward_terms=terms, **kwargs).splitlines():
        logger.info("%s", line)


def startup_summary(cfg: C.RunConfig, *, params: Any, mesh, pipeline, settings, out_dir, step: int = 0,
                    reward_terms: list[tuple[str, float]] | None = None, prompts: int = 0) -> str:
    """The summary: a title line, then lines of `label  text` (see the module docstring). `settings`: the
    update's `StepSettings`; `reward_terms`: (spec, weight) of each reward term (default: from the config).
    `pipeline` None: before the semantic-entropy annotation of `prompts` prompts, which the curriculum's
    stages and the step count depend on (they are summarised as pending)."""
    m, r, t, lo, d, cc = cfg.model, cfg.rollout, cfg.train, cfg.loss, cfg.data, cfg.curriculum
    lines: list[tuple[str, str]] = []

    # -- MODEL AND DEVICES
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    lines.append(("model", (f"{m.path} ({human_count(n_params)} params; weights {m.param_dtype}, compute {m.dtype}, "
                           f"remat {m.remat})")))
    if m.lora_rank:
        trained = sum(int(x.size) for x in jax.tree.leaves(lora.trainable(params)))
        targets = m.lora_targets if isinstance(m.lora_targets, str) else " ".join(m.lora_targets)
        lines.append(("lora", (f"rank {m.lora_rank}, alpha {m.lora_alpha:g}, on {targets}: {human_count(trained)} "
                               f"trained params ({trained / max(n_params, 1):.2%}); the base is frozen")))
    if mesh is None:
        devices = f"none (1 device), {jax.process_count()} process(es)"
    else:
        shape = " x ".join(f"{k} {v}" for k, v in mesh.shape.items())
        devices = (f"{shape} = {mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
                   f"{jax.process_count()} process(es), {settings.shards} data shard(s)")
    lines.append(("mesh", devices))

    # -- ONE STEP
    rows = t.prompts_per_step * r.n
    decode = f"{r.slots} decode slots (continuous batching)" if r.slots else "every row decodes at once"
    lines.append(("rollout", (f"{t.prompts_per_step} prompts x {r.n} samples = {rows} sequences per step, each at "
                             f"most {max(r.prompt_buckets)} prompt + {r.max_new_tokens} response tokens "
                             f"({human_count(rows * r.max_new_tokens)} response tokens per step at most); "
                             f"temperature {r.temperature:g}; {decode}")))
    minis = t.prompts_per_step // t.minibatch_prompts
    per_shard = C.microbatch_per_shard(cfg, settings.shards)
    lines.append(("update", (f"{minis} mini-batch(es) of {t.minibatch_prompts * r.n} sequences x {t.ppo_epochs} "
                            f"epoch(s) = {minis * t.ppo_epochs} optimizer step(s) per RL step; "
                            f"{settings.num_micro} micro-batch(es) of {per_shard} sequences per data shard each")))

    # -- DATA AND SCHEDULE
    seed = d.arithmetic_seed if d.arithmetic_seed >= 0 else t.seed
    source = d.train if d.task == "math" else f"arithmetic task (seed {seed})"
    val = f"; eval every {t.eval_every} steps on {cfg.val.data or 'the held-out split'}" if t.eval_every else ""
    kind = f"semantic entropy, {cc.mode}, {cc.order}" if cc.enabled else "none (shuffled epochs)"
    until = f"train.steps={t.steps}" if t.steps else "until the curriculum ends"
    if pipeline is None:  # before the annotation that orders the prompts
        lines.append(("data", f"{prompts} prompts from {source}{val}"))
        lines.append(("curriculum", f"{kind} ({cc.stages} stages, {cc.epochs_per_stage} epoch(s) each: sized "
                                    f"after the semantic-entropy annotation of the {prompts} prompts, "
                                    f"{cc.samples} samples each)"))
        lines.append(("steps", f"{t.steps or 'known after the annotation'} ({until})"))
    else:
        cur = pipeline.curriculum
        lines.append(("data", f"{cur.num_prompts} prompts from {source}{val}"))
        stages = ", ".join(f"stage {s}: {cur.stage_indices(s).size} prompts, {pipeline.steps_per_epoch(s)} steps x "
                           f"{cur.epochs_per_stage} epoch(s)" for s in range(cur.num_stages))
        boundary = f"; at a new stage: {t.stage_boundary}" if cur.num_stages > 1 else ""
        lines.append(("curriculum", f"{kind} ({stages}){boundary}"))
        resuming = f", resuming after step {step}" if step else ""
        lines.append(("steps", f"{planned_steps(cfg, pipeline)} ({until}){resuming}"))

    # -- OBJECTIVE
    hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(resolve_params(lo.name, dict(lo.params)).items()))
    kl = f"KL to the reference {lo.kl_coef:g} ({lo.kl_estimator})" if lo.kl_coef else "no KL"
    scope = ("selection over the whole mini-batch" if settings.scope == "global"
             else f"selection per {settings.scope_seqs} sequences of a data shard")
    lines.append(("loss", f"{lo.name} ({hp}); {scope}; agg {lo.agg}, advantage {lo.advantage}, {kl}"))
    o = cfg.optim
    lines.append(("optimizer", (f"AdamW lr {o.lr:g} ({o.schedule}, {o.warmup_steps} warm-up steps), "
                               f"weight decay {o.weight_decay:g}, grad clip {o.grad_clip:g}")))
    if reward_terms is None:
        reward_terms = list(zip(cfg.reward.fn, cfg.reward.weights or [1.0] * len(cfg.reward.fn)))
    terms = " + ".join(f"{w:g} x {spec}" for spec, w in reward_terms)
    lines.append(("reward", f"{terms} (timeout {cfg.reward.timeout_s:g} s per response)"))

    # -- OUTPUT
    written = ["metrics.jsonl", "checkpoints/"]
    written += [f"rollouts.jsonl every {t.log_samples_every} steps"] if t.log_samples_every else []
    written += ["tb/"] if t.tensorboard else []
    written += ["W&B"] if t.wandb else []
    lines.append(("output", f"{out_dir} ({', '.join(written)})"))
    width = max(len(label) for label, _ in lines)
    return "run summary\n" + "\n".join(f"  {label.ljust(width)}  {text}" for label, text in lines)
