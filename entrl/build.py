"""What every command starts from, built from a run config: the distributed runtime and the device mesh,
where the policy's weights come from (an HF checkpoint directory, a hub id, an entrl run directory, or
the built-in demo model), and its tokenizer.

Design decisions:
- Below everything that builds on it: `entrl.rl.setup` (a training run), `entrl.plan` (the memory plan,
  which needs the model's config but never its weights) and `entrl.eval_suites` (`entrl eval`) all
  import this module, and it imports none of them.
- A bad setting is a one-line `ConfigError` saying what to change, raised before any weights are read
  or anything is compiled.
- An entrl run directory is a model too: its `policy/` when the run finished, else its latest
  checkpoint (`run_checkpoint_source`; `entrl.rl.setup.build_model` restores it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import jax

from entrl import config as C
from entrl import hub
from entrl import rundir as R
from entrl.models import ModelConfig
from entrl.models.lora import LoRASpec
from entrl.sharding import data_shards, make_mesh
from entrl.tokenizer import CHAR_TOKENIZER_FILE, CharTokenizer, load_tokenizer

log = logging.getLogger("entrl.setup")


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
    # also when they hold a whole step: the annotation's and the evaluation's calls may have more rows
    if cfg.rollout.slots > 0 and cfg.rollout.slots % shards:
        raise C.ConfigError(f"rollout.slots={cfg.rollout.slots} must be a multiple of the {shards} data shards "
                            "(mesh.data * mesh.fsdp): each shard decodes its own prompts in its own slots")
    rows = t.minibatch_prompts * n
    if rows % shards or rows % (shards * C.microbatch_per_shard(cfg, shards)):
        raise C.ConfigError(
            f"a mini-batch of {rows} sequences (train.minibatch_prompts * rollout.n) must split into the {shards} "
            f"data shards (mesh.data * mesh.fsdp) x train.microbatch_per_shard={t.microbatch_per_shard}; change "
            "train.microbatch_per_shard or the mesh")
    scope, seqs = C.selection_scope(cfg, shards)
    micro = C.microbatch_per_shard(cfg, shards)
    if scope == "microbatch" and ((rows // shards) % seqs or (micro % seqs and seqs % micro)):
        raise C.ConfigError(
            f"selection scopes of {seqs} sequences per data shard (loss.scope_seqs, or loss {cfg.loss.name!r}'s "
            f"own) must divide a shard's {rows // shards} sequences of a mini-batch and divide, or be a multiple "
            f"of, its micro-batch of {micro} (train.microbatch_per_shard); change loss.scope_seqs or the batch")


# ---------------------------------------------------------------------------
# The model's origin and its tokenizer
# ---------------------------------------------------------------------------


def resolve_model_dir(path: str, *, weights: bool = True) -> Path:
    """A local HF checkpoint dir, an entrl run dir's `policy/`, or a hub id (downloaded). With `weights`
    (to load the model, not only its config or tokenizer), a directory without its weight files is an error.

    A run directory without `policy/` has no HF checkpoint: `build_model` restores its latest
    checkpoint instead (`run_checkpoint_source`); here it is an error saying how to export one.
    """
    p = Path(path)
    if p.is_dir():
        if R.is_run_dir(p):  # before config.json: an old run dir's config.json is the run's, not a model's
            if (p / "policy" / "config.json").exists():
                return _with_weights(path, p / "policy", weights)
            raise C.ConfigError(f"model.path={path!r} is an entrl run directory without policy/ (the run did not "
                                f"finish); write one with `entrl export {path} --out DIR` and use DIR")
        if (p / "config.json").exists():
            return _with_weights(path, p, weights)
        raise C.ConfigError(f"model.path={path!r} is a directory without config.json (not an HF checkpoint "
                            "nor an entrl run directory)")
    if p.exists():
        raise C.ConfigError(f"model.path={path!r} is a file; give a model directory (HF checkpoint or entrl run "
                            "dir), a hub id like Qwen/Qwen3-14B, or 'demo'")
    return _with_weights(path, _from_hub(
        "model.path", path, ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        instead="give an HF checkpoint dir, an entrl run dir, a hub id like Qwen/Qwen3-14B, or 'demo'"), weights)


def check_tokenizer_fits(cfg: C.RunConfig, tokenizer, vocab_size: int) -> None:
    """ConfigError when the tokenizer has ids the model's embedding table has no row for (another model
    family's tokenizer: its ids would index past the table, which XLA clamps silently)."""
    if tokenizer.vocab_size > vocab_size:
        raise C.ConfigError(f"the tokenizer ({cfg.model.tokenizer or cfg.model.path!r}) has {tokenizer.vocab_size} "
                            f"tokens, the model {cfg.model.path!r} embeds {vocab_size}: they are not a pair; set "
                            "model.tokenizer to the model's own tokenizer (or leave it empty)")


def _with_weights(given: str, d: Path, weights: bool = True) -> Path:
    """`d`, a model directory, unless `weights` and its weight files are missing (found before the
    tokenizer, the data and any compile; `load_pretrained` checks each tensor as it reads)."""
    if not weights:
        return d
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise C.ConfigError(f"model.path={given!r}: {index.name} is not a safetensors index") from None
        missing = sorted(f for f in shards if not (d / f).is_file())
        if missing:
            raise C.ConfigError(f"model.path={given!r}: {len(missing)} weight shard(s) listed in {index.name} are "
                                f"missing, e.g. {missing[0]}")
    elif not (d / "model.safetensors").is_file():
        raise C.ConfigError(f"model.path={given!r} has config.json but no weights (model.safetensors or "
                            "model.safetensors.index.json)")
    return d


def _from_hub(key: str, name: str, patterns: list[str], *, instead: str) -> Path:
    """`name` (the value of config key `key`, no local path) downloaded from the Hugging Face Hub, its files
    matching `patterns`. One-line ConfigErrors: a name that cannot be a hub id never reaches the network
    (`instead`: what to give), and a failed download names its reason."""
    if not _HUB_ID.fullmatch(name) or Path(name).suffix in _FILE_SUFFIXES:
        raise C.ConfigError(f"{key}={name!r} does not exist ({instead})")
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (hub downloads only)

    offline = hub.unreachable()  # then only the local cache: no 25 s of retries before the error
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=bool(offline)))
    except (OSError, ValueError) as e:  # the hub's errors (not found, gated, offline, no network; a bad id)
        if offline:
            raise C.ConfigError(f"{key}={name!r} is not a local directory; {hub.offline_error(name, 'model')}"
                                ) from None
        reason = " ".join(str(e).split()) or type(e).__name__
        raise C.ConfigError(f"{key}={name!r} is not a local directory and could not be downloaded from the "
                            f"Hugging Face Hub: {reason[:300]}") from None


# A hub repo id, "namespace/name": dots are allowed ("Qwen/Qwen2.5-Math-7B", "...-Qwen-1.5B").
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".safetensors", ".bin", ".pt", ".parquet", ".txt", ".gguf")


def demo_model_config(vocab_size: int, cfg: C.RunConfig, eos_id: int, pad_id: int, bos_id: int | None):
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


def run_model_config(cfg: C.RunConfig, run: RunSource) -> C.RunConfig:
    """`cfg` with the model identity (path, demo shape, tokenizer) of the run's own model."""
    m = run.cfg.model
    tok = cfg.model.tokenizer or m.tokenizer or ("char" if m.path == "demo" else "")
    return C.replace(cfg, **{"model.path": m.path, "model.tokenizer": tok, "model.demo_hidden": m.demo_hidden,
                             "model.demo_layers": m.demo_layers, "model.demo_heads": m.demo_heads})


def lora_spec(cfg: C.RunConfig) -> LoRASpec | None:
    """The run's `entrl.models.lora.LoRASpec` (adapters in `model.param_dtype`: they are the trained
    weights), or None when `model.lora_rank` is 0."""
    m = cfg.model
    return LoRASpec(m.lora_rank, m.lora_alpha, tuple(m.lora_targets), m.param_dtype) if m.lora_rank else None


def base_param_dtype(cfg: C.RunConfig) -> str:
    """The storage dtype of the model's own weights: `model.param_dtype`, or under LoRA (where they are
    frozen, and every use casts them to it) the compute dtype `model.dtype`: half the bytes in bfloat16."""
    return cfg.model.dtype if cfg.model.lora_rank else cfg.model.param_dtype


# Files one of which a tokenizer directory holds (HF fast and slow tokenizers, sentencepiece, entrl's own).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    CHAR_TOKENIZER_FILE)


def resolve_tokenizer_dir(name: str) -> Path:
    """`model.tokenizer` as a local directory holding a tokenizer: a tokenizer or model directory, an entrl run
    directory's `policy/`, or a hub id (its tokenizer files downloaded). Errors as `resolve_model_dir`'s: one
    line, and a name that is no hub id never reaches the network."""
    p = Path(name)
    if p.is_dir():
        if R.is_run_dir(p) and (p / "policy").is_dir():
            p = p / "policy"
        if not any((p / f).is_file() for f in _TOKENIZER_FILES):
            raise C.ConfigError(f"model.tokenizer={name!r} is a directory without tokenizer files (none of "
                                f"{', '.join(_TOKENIZER_FILES)})")
        return p
    if p.exists():
        raise C.ConfigError(f"model.tokenizer={name!r} is a file; give a tokenizer directory, a hub id like "
                            "Qwen/Qwen3-14B, 'char', or nothing (the tokenizer of model.path)")
    return _from_hub("model.tokenizer", name, ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
                     instead="give a tokenizer directory, a hub id like Qwen/Qwen3-14B, 'char', or nothing for the "
                             "tokenizer of model.path")


def build_tokenizer(cfg: C.RunConfig):
    """The run's tokenizer: `model.tokenizer` ("char", a directory or a hub id), else that of `model.path` (the
    character tokenizer for the demo model). ConfigError, in one line, when it does not load."""
    run = run_checkpoint_source(cfg.model.path)
    if run is not None:
        return build_tokenizer(run_model_config(cfg, run))
    m = cfg.model
    if m.tokenizer == "char" or (not m.tokenizer and m.path == "demo"):
        return CharTokenizer()
    key, value = ("model.tokenizer", m.tokenizer) if m.tokenizer else ("model.path", m.path)
    directory = resolve_tokenizer_dir(m.tokenizer) if m.tokenizer else resolve_model_dir(m.path, weights=False)
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:  # files transformers cannot read as a tokenizer
        cause = e.__cause__ or e  # load_tokenizer's own wrapping says what the key's message says
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise C.ConfigError(f"{key}={value!r}: could not load its tokenizer: {reason[:400]}"
                            + ("" if m.tokenizer else " (or set model.tokenizer)")) from None
