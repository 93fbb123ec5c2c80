"""`entrl plan`: will a run fit in accelerator memory? Answered before any weight is read.

The plan builds the run abstractly and compiles the very jitted functions
`entrl train` runs, for the run's largest shapes, on the real devices or on N
simulated CPU devices, and reads XLA's memory analysis of each:

    update      `entrl.rl.step.make_update_fn` (one mini-batch, gradient accumulation, AdamW)
    log-probs   `entrl.token_stats.compute_logprobs` (old and reference log-probs of the step's rows)
    rollout     the rollout `Sampler` (one call on the step's prompts; at most `rollout.slots` rows decoding)
    annotate    the semantic-entropy annotation inside `entrl train`, when it is not the rollout's program
                (`curriculum.samples` != `rollout.n`)
    eval        the periodic-evaluation sampler of `train.eval_every` (`val.*`: `val.n` samples, its budget),
                and with `val.entropy` the forward that measures the samples' entropy

Design decisions:
- Nothing is allocated: params, optimizer state and batches are
  `jax.ShapeDtypeStruct`s carrying the shardings `entrl train` would give them
  (`nnx.eval_shape` + `entrl.sharding.param_shardings`), so planning a 14B
  model on a laptop takes seconds of memory and no download (the paper models'
  architectures are in `entrl.models.config.HUB_PRESETS`).
- A phase's peak per device = the state resident through the whole run
  (master params, optimizer moments, the reference copy) + what the phase's
  program adds: its other arguments, its temporaries and its outputs (XLA's
  `memory_analysis`, donated/aliased outputs counted once). The update also
  holds the step's batch (rollout tokens, old/reference log-probs).
- On simulated CPU devices the numbers are XLA:CPU's buffer assignment of the
  same partitioned programs; TPU/GPU compilers fuse and schedule differently,
  so the plan keeps `headroom` (10% by default) below the HBM budget. On the
  real accelerator the plan reads the accelerator compiler's own analysis.
  CPU compiles skip LLVM optimisation (`xla_backend_optimization_level=0`):
  buffer assignment happens before it, so the memory numbers are the same and
  compiling is ~30% faster.
- Programs are compiled once per process for a given lowered text: presets
  that differ only in things a program does not see (another loss, the
  curriculum) share the sampler's and log-prob programs' analyses. A plan
  that only lowers (`compile=False`) uses an analysis recorded for the same
  lowered text (`RECORDED`, keyed by its SHA-256) when there is one: the
  same program compiles to the same buffers, so CI checks the paper presets'
  fit without the minutes of compiling (tests/test_presets.py).
- Under LoRA (`model.lora_rank` > 0) the params include the adapters, the
  optimizer state and the reference copy are the adapters' only (the reference
  shares the frozen base), and the update's gradients are the adapters'; a note
  compares the resident state with full fine-tuning's (shapes only, no compile).
Left out on purpose: host (CPU) memory, and the Python-side verifier pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from entrl import build as B
from entrl import config as C
from entrl import evaluation as EV
from entrl import token_stats as TS
from entrl.models import PRESETS, ModelConfig, Transformer, lora
from entrl.models.config import HUB_PRESETS
from entrl.rl import step as ST
from entrl.rl.summary import human_count
from entrl.rl.trainer import opt_state_shardings, run_optimizer, step_settings
from entrl.sampling import (
    Sampler,
    SamplingConfig,
    annotation_batch_prompts,
    cache_dtype,
    rollout_settings,
    special_token_ids,
    val_batch_prompts,
    val_settings,
)
from entrl.sharding import batch_sharding, data_shards, make_mesh, param_shardings, sampler_prompts

GIB = 2**30
DEFAULT_HEADROOM = 0.10

# HBM per device (chip) of the accelerators the presets suggest, in GiB as sold. JAX's device is one
# chip on every kind listed (v4/v5p megacore: two TensorCores, one device).
HBM_GIB = {"tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "a100-40gb": 40, "a100-80gb": 80,
           "h100": 80, "h200": 141, "l4": 24, "t4": 15}
# Chips per slice: TPU v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips.
_CORES_PER_CHIP = {"tpu-v4": 2, "tpu-v5p": 2, "tpu-v5e": 1, "tpu-v6e": 1}


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `kind` (a `HBM_GIB` key) x `devices`."""

    kind: str
    devices: int

    @property
    def hbm_bytes(self) -> int:
        return int(HBM_GIB[self.kind] * GIB)

    def __str__(self) -> str:
        return f"{self.devices} x {self.kind} ({HBM_GIB[self.kind]} GiB each)"


def parse_target(text: str) -> Target:
    """`tpu-v5p-8` / `v5e-16` (TPU slice names), `8xh100` / `h100` (GPUs) -> Target; ConfigError otherwise."""
    t = text.strip().lower().replace(" ", "").replace("_", "-")
    m = re.fullmatch(r"(?:tpu-?)?(v4|v5p|v5e|v6e)-(\d+)", t)
    if m:
        kind = f"tpu-{m.group(1)}"
        cores = int(m.group(2))
        chips, rest = divmod(cores, _CORES_PER_CHIP[kind])
        if rest or chips < 1:
            raise C.ConfigError(f"target {text!r}: a {kind} slice of {cores} TensorCores is not whole chips")
        return Target(kind, chips)
    m = re.fullmatch(r"(?:(\d+)x)?(a100-40gb|a100-80gb|h100|h200|l4|t4)", t)
    if m:
        return Target(m.group(2), int(m.group(1) or 1))
    raise C.ConfigError(f"unknown target {text!r}; use a TPU slice (tpu-v5p-8, v5e-16, v4-8, v6e-8) or GPUs "
                        f"(8xh100, a100-80gb, h200, ...): {', '.join(HBM_GIB)}")


_SUGGESTION = re.compile(r"^#\s+(?P<label>[^:]+?):\s+(?P<overrides>mesh\.data=\S+\s+mesh\.fsdp=\S+\s+mesh\.tensor=\S+(?:\s+[\w.]+=\S+)*)\s*$")


def mesh_suggestions(path: str | Path) -> list[tuple[str, Target, list[str]]]:
    """The `# <slice>: mesh.data=.. mesh.fsdp=.. mesh.tensor=.. [key=value ...]` comment lines of a preset's
    YAML files (the file and its `base:` chain): (label, target, overrides). Labels read `TPU v5p-8 (4
    chips)` or `8x H100`; the overrides after the mesh are what that slice needs (e.g. rollout.slots)."""
    out, seen = [], set()
    path = Path(path)
    while path is not None and path.exists() and path.resolve() not in seen:
        seen.add(path.resolve())
        base = None
        for line in path.read_text().splitlines():
            m = _SUGGESTION.match(line.strip())
            if m:
                label = m.group("label").strip()
                out.append((label, parse_target(re.sub(r"\(.*\)", "", label)), m.group("overrides").split()))
            b = re.match(r"^base:\s*(\S+)", line)
            if b:
                base = path.parent / b.group(1)
        path = base
    return out


# ---------------------------------------------------------------------------
# The run, abstractly
# ---------------------------------------------------------------------------


def model_config(cfg: C.RunConfig) -> ModelConfig:
    """The policy's architecture without reading weights: the demo model, a local HF/run directory's
    config.json, a paper model's hub id (built in), or a hub id already in the local HF cache."""
    path = cfg.model.path
    run = B.run_checkpoint_source(path)
    if run is not None:
        return model_config(B.run_model_config(cfg, run))
    if path == "demo":
        tok = B.build_tokenizer(cfg)
        return B.demo_model_config(tok.vocab_size, cfg, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    if path in HUB_PRESETS:
        return PRESETS[HUB_PRESETS[path]]
    if Path(path).is_dir():
        return ModelConfig.from_pretrained(B.resolve_model_dir(path, weights=False))  # the plan reads no weights
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 (hub cache lookups only)

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: the same answer
        cached = None
    if isinstance(cached, str):
        return ModelConfig.from_hf_dict(json.loads(Path(cached).read_text()))
    raise C.ConfigError(f"model.path={path!r}: planning needs the model's config.json; give a local checkpoint "
                        f"directory (built in without a download: {', '.join(HUB_PRESETS)})")


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (each leaf's shard shape x itemsize; the max over
    devices, which for even shardings is every device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Program:
    """Memory analysis of one compiled program (per device, bytes) and its compile time."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    compile_s: float
    key: str = ""  # SHA-256 of the lowered program text
    known: bool = True  # False: lowered only, memory unknown (the byte counts are 0)

    def extra(self, resident_args: int) -> int:
        """What the program adds on top of `resident_args` bytes of its arguments that live anyway."""
        return self.arguments - resident_args + self.temporaries + self.outputs - self.aliased


_ANALYSES: dict[str, tuple[int, int, int, int, float]] = {}
# Lowered-text SHA-256 -> (arguments, outputs, aliased, temporaries) bytes, from an earlier compile of
# the same program with the same jax/jaxlib (filled by the caller; see `_lower_only`).
RECORDED: dict[str, tuple[int, int, int, int]] = {}


def _key(lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _lower_only(name: str, lower) -> Program:
    """Trace and lower (`lower()`), no compile: shapes and shardings agree. Memory: the analysis
    recorded for this lowered text (`RECORDED`), else unknown (0, `known=False`)."""
    t0 = time.perf_counter()
    key = _key(lower())
    if key in RECORDED:
        return Program(name, *RECORDED[key], compile_s=time.perf_counter() - t0, key=key)
    return Program(name, 0, 0, 0, 0, time.perf_counter() - t0, key=key, known=False)


def _analyse(name: str, lower) -> Program:
    """Compile `lower()` (once per lowered text in this process) and read the memory analysis."""
    lowered = lower()
    key = _key(lowered)
    if key not in _ANALYSES:
        t0 = time.perf_counter()
        options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
                   if jax.default_backend() == "cpu" else None)
        mem = lowered.compile(compiler_options=options).memory_analysis()
        _ANALYSES[key] = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                          mem.temp_size_in_bytes, time.perf_counter() - t0)
    return Program(name, *_ANALYSES[key], key=key)


@dataclasses.dataclass
class MemoryPlan:
    """What `entrl plan` reports; `per_device_bytes` keys: params, optimizer, reference, update_peak,
    logprob_peak, rollout_peak, and when the run has them annotate_peak and eval_peak (bytes on one device)."""

    model: str
    num_params: int
    mesh: dict[str, int]
    devices: int
    platform: str
    budget_bytes: int | None
    budget_source: str
    headroom: float
    per_device_bytes: dict[str, int]
    programs: dict[str, dict]
    tokens_per_step: dict[str, int]
    steps_per_stage: list[int] | None
    steps_note: str
    notes: list[str]

    @property
    def peak_bytes(self) -> int:
        return max(v for k, v in self.per_device_bytes.items() if k.endswith("_peak"))

    @property
    def fits(self) -> bool | None:
        if self.budget_bytes is None:
            return None
        return self.peak_bytes <= self.budget_bytes * (1 - self.headroom)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        d["peak_bytes"] = self.peak_bytes
        return d

    def table(self) -> str:
        gib = lambda b: f"{b / GIB:.2f}"
        budget = (f"{gib(self.budget_bytes)} GiB ({self.budget_source}), {self.headroom:.0%} headroom"
                  if self.budget_bytes else "unknown (give --hbm-gb or --target)")
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines = [f"plan: {self.model} ({human_count(self.num_params)} params) on {self.devices} {self.platform} "
                 f"devices, mesh {mesh}; budget per device {budget}",
                 "", "| per device | GiB |", "|---|---|"]
        names = {"params": "params (master)", "optimizer": "optimizer state", "reference": "reference copy",
                 "update_peak": "update peak", "logprob_peak": "log-prob peak", "rollout_peak": "rollout peak",
                 "annotate_peak": "annotate peak", "eval_peak": "eval peak"}
        for k, v in self.per_device_bytes.items():
            lines.append(f"| {names.get(k, k)} | {gib(v)} |")
        fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[self.fits]
        lines += ["", f"peak {gib(self.peak_bytes)} GiB per device: {fits}"]
        t = self.tokens_per_step
        lines.append(f"tokens per step: {t['prompt']:,} prompt + up to {t['response']:,} response "
                     f"({t['rows']:,} rows)")
        steps = ", ".join(map(str, self.steps_per_stage)) if self.steps_per_stage else "unknown"
        lines.append(f"RL steps per curriculum stage: {steps}{f' ({self.steps_note})' if self.steps_note else ''}")
        lines.append("compile s: " + ", ".join(f"{k} {v['compile_s']:.1f}" for k, v in self.programs.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _steps_per_stage(cfg: C.RunConfig) -> tuple[list[int] | None, str]:
    """RL steps of each curriculum stage, from the number of training prompts (when the file is readable)."""
    d, cur = cfg.data, cfg.curriculum
    if d.task == "arithmetic":
        prompts = d.arithmetic_train_size
    else:
        path = Path(d.train) if d.train else None
        if path is None or not path.is_file():
            return None, f"data.train={d.train!r} is not a local file"
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415 (Parquet only)

            prompts = pq.ParquetFile(path).metadata.num_rows
        else:
            with path.open("rb") as f:
                prompts = sum(1 for line in f if line.strip())
        if d.max_rows:
            prompts = min(prompts, d.max_rows)
    stages = 1 if not cur.enabled or cur.mode == "continuous" else (len(cur.thresholds) + 1 if cur.thresholds
                                                                     else cur.stages)
    if cur.enabled and cur.thresholds:
        return None, f"{prompts} prompts; stage sizes depend on the SE values (curriculum.thresholds)"
    sizes = [len(a) for a in np.array_split(np.arange(prompts), stages)]
    note = f"{prompts} prompts before dropping long ones"
    return [s // cfg.train.prompts_per_step * cur.epochs_per_stage for s in sizes], note


def plan_run(cfg: C.RunConfig, *, budget_bytes: int | None = None, budget_source: str = "",
             headroom: float = DEFAULT_HEADROOM, with_eval: bool = True, compile: bool = True,
             only: tuple[str, ...] | None = None, annotates: bool = True) -> MemoryPlan:
    """Plan `cfg` on the current devices (see the module docstring). ConfigError on a config problem.

    annotates: whether the run's curriculum will annotate its prompts (False when the data has the SE
    column already: `entrl train` knows; `entrl plan` does not read the data and assumes it will).

    compile=False only traces and lowers the programs (their sharded shapes must agree; seconds instead
    of minutes): the memory figures of the programs are then 0, unless `RECORDED` holds the analysis
    of the same lowered text (`programs[name]["known"]`). `only`: build just these programs
    (update, logprob, rollout, annotate, eval; None = all); the others count 0.
    """
    mesh = B.build_mesh(cfg)
    shards = data_shards(mesh)
    mcfg = model_config(cfg)
    m, r, t = cfg.model, cfg.rollout, cfg.train
    plen = max(r.prompt_buckets)

    # -- state -----------------------------------------------------------------
    spec = B.lora_spec(cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(
        mcfg, rngs=nnx.Rngs(0), dtype=m.dtype, param_dtype=B.base_param_dtype(cfg), remat=m.remat, lora=spec)))
    shardings = param_shardings(state, mesh)
    params = _abstract(state, shardings)
    optimizer = run_optimizer(cfg)
    opt_sh, opt_state, ref = _resident_state(cfg, optimizer, params, mesh)
    sizes = {"params": _per_device_bytes(params), "optimizer": _per_device_bytes(opt_state),
             "reference": _per_device_bytes(ref) if ref is not None else 0}
    resident = sum(sizes.values())

    def rows_of(n_rows, *shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((n_rows, *shape), dtype, sharding=batch_sharding(mesh, 1 + len(shape)))

    step_rows = t.prompts_per_step * r.n
    L = r.max_new_tokens
    batch = {"prompt_ids": rows_of(step_rows, plen), "prompt_mask": rows_of(step_rows, plen),
             "resp_ids": rows_of(step_rows, L), "resp_len": rows_of(step_rows),
             "resp_mask": rows_of(step_rows, L, dtype=jnp.float32), "advantages": rows_of(step_rows, dtype=jnp.float32)}
    step_batch_bytes = _per_device_bytes(batch) + 2 * _per_device_bytes(rows_of(step_rows, L, dtype=jnp.float32))
    programs: dict[str, Program] = {}
    settings = step_settings(cfg, shards)
    want = lambda name: only is None or name in only  # noqa: E731
    analyse = _analyse if compile else _lower_only

    with jax.set_mesh(mesh):
        # -- update ------------------------------------------------------------------
        update = ST.make_update_fn(graphdef, optimizer, settings, state_shardings=(shardings, opt_sh))
        mb_rows = t.minibatch_prompts * r.n
        mb = {"prompt_ids": rows_of(mb_rows, plen), "prompt_mask": rows_of(mb_rows, plen),
              "resp_ids": rows_of(mb_rows, L), "resp_len": rows_of(mb_rows), **{k: rows_of(mb_rows, L, dtype=jnp.float32)
                                                  for k in ("resp_mask", "old_logp", "ref_logp")},
              "advantages": rows_of(mb_rows, dtype=jnp.float32)}
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                   sharding=NamedSharding(mesh, PartitionSpec()))
        if want("update"):
            programs["update"] = analyse("update", lambda: update.lower(params, opt_state, mb, rng))
        # -- log-probs ----------------------------------------------------------------
        micro = C.microbatch_per_shard(cfg, shards)
        lp_args = dict(temperature=settings.temperature, num_micro=step_rows // (shards * micro),
                       chunk_size=settings.chunk_size, shards=shards, length_buckets=settings.length_buckets)
        if want("logprob"):
            programs["logprob"] = analyse("logprob", lambda: TS.compute_logprobs.lower(graphdef, params, batch, **lp_args))
    # -- rollout ------------------------------------------------------------------
    ids = _token_ids(mcfg)
    sc = SamplingConfig(**{**rollout_settings(cfg), "max_new_tokens": L}, **ids, slots=r.slots)
    prompts = rows_of(t.prompts_per_step, plen)
    if want("rollout"):
        programs["rollout"] = analyse("rollout", lambda: Sampler(sc, mesh=mesh).lower(graphdef, params, prompts, prompts))
    per = dict(sizes)
    params_bytes = sizes["params"]
    known = lambda name: name in programs and programs[name].known  # noqa: E731
    extra = lambda name, resident_args: programs[name].extra(resident_args) if known(name) else 0  # noqa: E731
    per["update_peak"] = resident + step_batch_bytes + extra("update", sizes["params"] + sizes["optimizer"])
    per["logprob_peak"] = resident + extra("logprob", params_bytes + _per_device_bytes(batch)) + step_batch_bytes
    per["rollout_peak"] = resident + extra("rollout", params_bytes)
    notes = [_lora_note(cfg, spec, optimizer, params, sizes, mesh)] if spec is not None else []
    se = cfg.curriculum
    if annotates and C.needs_semantic_entropy(cfg) and se.annotate and se.samples != r.n and want("annotate"):
        # The SE annotation inside `entrl train` (before the optimizer state exists) when it is not the
        # rollout's own program: a rollout call's prompts, curriculum.samples each, in the rollout's slots.
        aprompts = annotation_batch_prompts(cfg)
        ap = rows_of(aprompts, plen)
        asc = SamplingConfig(**{**rollout_settings(cfg), "n": se.samples, "max_new_tokens": L}, **ids, slots=r.slots)
        programs["annotate"] = analyse("annotate", lambda: Sampler(asc, mesh=mesh).lower(graphdef, params, ap, ap))
        per["annotate_peak"] = params_bytes + sizes["reference"] + extra("annotate", params_bytes)
        notes.append(f"annotate (when the training data lacks {se.se_column}): {aprompts} prompts x {se.samples} "
                     "samples per sampler call")
    if with_eval and cfg.train.eval_every and want("eval"):  # periodic evaluation is part of the run only when it is on
        vs = val_settings(cfg)
        eval_prompts, esh = sampler_prompts(val_batch_prompts(cfg), vs["n"], mesh)
        ep = jax.ShapeDtypeStruct((eval_prompts, plen), jnp.int32, sharding=esh)
        esc = SamplingConfig(**vs, **ids)
        programs["eval"] = analyse("eval", lambda: Sampler(esc, mesh=mesh).lower(graphdef, params, ep, ep))
        eval_extra = extra("eval", params_bytes)
        if cfg.val.entropy:  # one more forward over a call's rows (val.entropy)
            erows = eval_prompts * vs["n"]
            ebatch = {"prompt_ids": rows_of(erows, plen), "prompt_mask": rows_of(erows, plen),
                      "resp_ids": rows_of(erows, vs["max_new_tokens"])}
            num_micro = EV.entropy_micro_batches(erows, shards, C.microbatch_per_shard(cfg, shards))
            programs["eval_entropy"] = analyse("eval_entropy", lambda: TS.compute_logprobs.lower(
                graphdef, params, ebatch, temperature=esc.logprob_temperature, num_micro=num_micro,
                chunk_size=EV.ENTROPY_CHUNK, shards=shards))
            eval_extra = max(eval_extra, extra("eval_entropy", params_bytes))
        per["eval_peak"] = resident + eval_extra
        notes.append(f"eval (val.*): {eval_prompts} problems x {vs['n']} samples x {vs['max_new_tokens']} new "
                     f"tokens per sampler call{', then their entropy' if cfg.val.entropy else ''}")
    if jax.default_backend() == "cpu":
        notes.append("XLA:CPU analysis of the partitioned programs on simulated devices; accelerator compilers "
                     "differ, hence the headroom")
    steps, steps_note = _steps_per_stage(cfg)
    return MemoryPlan(
        model=cfg.model.path, num_params=mcfg.num_params(), mesh=dict(mesh.shape), devices=mesh.size,
        platform=jax.default_backend(), budget_bytes=budget_bytes, budget_source=budget_source, headroom=headroom,
        per_device_bytes=per,
        programs={k: {**dataclasses.asdict(p), "extra": p.extra(0)} for k, p in programs.items()},
        tokens_per_step={"rows": step_rows, "prompt": step_rows * plen, "response": step_rows * L},
        steps_per_stage=steps, steps_note=steps_note, notes=notes)


def _resident_state(cfg: C.RunConfig, optimizer, params, mesh):
    """(optimizer state shardings, optimizer state, reference copy or None) of abstract `params`, as
    `entrl train` allocates them: for the trained params (all, or the LoRA adapters)."""
    trained = lora.trainable(params)
    opt_sh = opt_state_shardings(optimizer, trained, mesh)
    opt_state = _abstract(jax.eval_shape(optimizer.init, trained), opt_sh)
    if cfg.loss.kl_coef == 0:
        return opt_sh, opt_state, None
    if lora.has_adapters(params):  # a copy of the adapters; the frozen base is shared
        return opt_sh, opt_state, trained
    dtype = jnp.dtype(cfg.model.dtype)  # full fine-tuning: a copy of the params in the compute dtype
    return opt_sh, opt_state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), params)


def _lora_note(cfg: C.RunConfig, spec, optimizer, params, sizes: dict, mesh) -> str:
    """What LoRA saves: its weights, optimizer state and reference copy per device vs full fine-tuning's."""
    adapters, base = lora.split(params)
    masters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(cfg.model.param_dtype),
                                                          sharding=x.sharding), base)
    _, full_opt, full_ref = _resident_state(cfg, optimizer, masters, mesh)
    full = {"params": _per_device_bytes(masters), "optimizer": _per_device_bytes(full_opt),
            "reference": _per_device_bytes(full_ref) if full_ref is not None else 0}
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    size = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"
    return (f"LoRA r={spec.rank} alpha={spec.alpha:g} on {','.join(spec.targets)}: {count(adapters) / 1e6:.1f}M "
            f"trained params ({count(adapters) / count(base):.2%} of the base, whose weights are kept in "
            f"{cfg.model.dtype}); per device params / optimizer state / reference copy "
            f"{' / '.join(size(sizes[k]) for k in full)}, where full fine-tuning holds "
            f"{' / '.join(size(full[k]) for k in full)}")


def _token_ids(mcfg: ModelConfig) -> dict:
    """A sampler's stop, filler and banned ids from the model config (the plan reads no tokenizer), as
    `SamplingConfig.for_tokenizer` sets them from the tokenizer."""
    eos = mcfg.eos_token_ids or (0,)
    return special_token_ids(eos, mcfg.pad_token_id if mcfg.pad_token_id is not None else eos[0], mcfg.bos_token_id)


def _eval_sampling(cfg: C.RunConfig, mcfg: ModelConfig):
    """`entrl eval`'s sampler settings (`eval.*`)."""
    e = cfg.eval
    return SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens,
                          cache_dtype=cache_dtype(cfg, e.cache_dtype), **_token_ids(mcfg))


def plan_eval(cfg: C.RunConfig, *, budget_bytes: int | None = None, budget_source: str = "",
              headroom: float = DEFAULT_HEADROOM, batch_problems: int | None = None) -> MemoryPlan:
    """The memory plan of `entrl eval` with `cfg`: the weights in the compute dtype (all `entrl eval`
    loads) and one sampler call of `batch_problems` (default `eval.batch_problems`, else 64) problems."""
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise C.ConfigError(str(e)) from None
    shards = data_shards(mesh)
    mcfg = model_config(cfg)
    m, e = cfg.model, cfg.eval
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(mcfg, rngs=nnx.Rngs(0), dtype=m.dtype, param_dtype=m.dtype)))
    params = _abstract(state, param_shardings(state, mesh))
    batch = batch_problems or e.batch_problems or 64
    if batch * e.n % shards:
        raise C.ConfigError(f"{batch} problems x eval.n={e.n} rows do not split over the {shards} data shards")
    plen = max(cfg.rollout.prompt_buckets)
    _, sharding = sampler_prompts(batch, e.n, mesh)  # the rows split: no padding, as `entrl eval` samples it
    prompts = jax.ShapeDtypeStruct((batch, plen), jnp.int32, sharding=sharding)
    program = _analyse("eval", lambda: Sampler(_eval_sampling(cfg, mcfg), mesh=mesh).lower(graphdef, params, prompts, prompts))
    params_bytes = _per_device_bytes(params)
    rows = batch * e.n
    return MemoryPlan(
        model=cfg.model.path, num_params=mcfg.num_params(), mesh=dict(mesh.shape), devices=mesh.size,
        platform=jax.default_backend(), budget_bytes=budget_bytes, budget_source=budget_source, headroom=headroom,
        per_device_bytes={"params": params_bytes, "eval_peak": params_bytes + program.extra(params_bytes)},
        programs={"eval": {**dataclasses.asdict(program), "extra": program.extra(0)}},
        tokens_per_step={"rows": rows, "prompt": rows * plen, "response": rows * e.max_new_tokens},
        steps_per_stage=None, steps_note="entrl eval",
        notes=[f"entrl eval: {batch} problems x {e.n} samples per sampler call, weights in {m.dtype}"])


def auto_eval_batch(cfg: C.RunConfig, budget_bytes: int, headroom: float = DEFAULT_HEADROOM) -> int:
    """The most problems per evaluation sampler call that fit `budget_bytes` per device.

    One probe compile at the smallest batch gives the bytes per problem (KV cache, logits: linear in
    the batch; the probe's fixed costs make the estimate conservative); the chosen size is then planned
    itself and shrunk by a quarter until it fits.
    """
    shards = data_shards(make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    step = shards // math.gcd(shards, cfg.eval.n)  # the smallest batch whose rows split over the shards
    probe = plan_eval(cfg, budget_bytes=budget_bytes, batch_problems=step, headroom=headroom)
    params = probe.per_device_bytes["params"]
    per_problem = max((probe.per_device_bytes["eval_peak"] - params) / step, 1.0)
    batch = int((budget_bytes * (1 - headroom) - params) // per_problem) // step * step
    batch = min(max(batch, step), 4096)
    while batch > step and not plan_eval(cfg, budget_bytes=budget_bytes, batch_problems=batch,
                                         headroom=headroom).fits:
        batch = max(step, batch * 3 // 4 // step * step)
    return batch


def device_budget() -> tuple[int | None, str]:
    """HBM per device of the current accelerator (its own limit), or (None, why not)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None, "cpu"
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends that do not implement it
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    return None, f"{dev.device_kind}: no memory_stats"




def plan_suggested(paths: list[str | Path], devices: int, *, with_eval: bool = True, compile: bool = True,
                   only=None) -> list[dict]:
    """Plan every (preset, suggested mesh) among `paths` whose suggested slice has `devices` devices, on
    this process's devices (which must number `devices`): one summary dict per pair, with `error` set
    when the preset does not validate on that mesh. Programs shared between presets compile once.

    compile=False: lower only (see `plan_run`). only: None, or `only(path, overrides, cfg)` -> the
    programs to build for that pair (e.g. every loss's update on one mesh, all programs on the others).
    """
    if jax.device_count() != devices:
        raise ValueError(f"plan_suggested({devices}) needs {devices} devices, this process has {jax.device_count()}")
    out = []
    for path in paths:
        for label, target, overrides in mesh_suggestions(path):
            if target.devices != devices:
                continue
            row = {"config": str(path), "target": label, "overrides": overrides, "hbm_bytes": target.hbm_bytes}
            try:
                cfg = C.load_config(path, overrides)
                plan = plan_run(cfg, budget_bytes=target.hbm_bytes, budget_source=str(target), with_eval=with_eval,
                                compile=compile, only=None if only is None else tuple(only(path, overrides, cfg)))
            except C.ConfigError as e:
                row["error"] = str(e)
            else:
                known = all(v["known"] for v in plan.programs.values())
                row.update(fits=plan.fits if known else None, per_device_bytes=plan.per_device_bytes,
                           peak_bytes=plan.peak_bytes, compile_s={k: v["compile_s"] for k, v in plan.programs.items()},
                           programs={k: {"key": v["key"], "known": v["known"]} for k, v in plan.programs.items()},
                           table=plan.table())
            out.append(row)
    return out
