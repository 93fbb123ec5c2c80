"""Semantic-entropy annotation of a prompt set with a policy: sample, grade, cluster, resumable on disk.

The math (clustering, SE, per-prompt statistics) is `entrl.semantic_entropy`; this module runs it over
a dataset with the model.

Design decisions:
- Progress is a JSONL file: a header line with the provenance of the values (`se_provenance`: model
  weights, tokenizer, prompts, sampling settings, dataset), then one row per finished prompt,
  appended per batch. An interrupted annotation resumes where it stopped; values computed with other
  settings are never reused, and their file is moved aside, never deleted (`open_progress`).
- Every process samples the same batches (the sampler splits the rows over the devices); only
  process 0 writes, after every process has read the file (a barrier), so all of them decide alike.
- Sample keys are folded from the prompt's position in the record list, so a resumed run draws the
  same samples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from entrl.checkpoint import weights_digest
from entrl.evaluation import sample_and_grade
from entrl.progress import progress_bar
from entrl.rundir import append_text, as_path
from entrl.sampling import build_sampler
from entrl.semantic_entropy import SE_COLUMNS, batch_prompt_stats

log = logging.getLogger("entrl.semantic_entropy")

PROGRESS_FORMAT = 1  # version of the progress file's header line


def se_provenance(cfg, params, tokenizer, prompt_tokens, records, *, n: int, seed: int) -> dict:
    """What an annotation's values depend on: cached values are reused only when all of it is equal.

    model: `model.path`, its dtype and a fingerprint of the parameter values themselves (the
    checkpoint's `fingerprint_leaves`: two runs of the same weights agree wherever they were loaded
    from; a fine-tuned or re-initialised model never does). tokenizer: its name and size, plus a
    hash of the prompt tokens (which also covers the prompt suffix and chat template). Sampling: n,
    temperature, top-p, top-k, max new tokens, KV-cache dtype, seed. dataset: a hash of every
    record's (id, problem, answer) in order (sample keys depend on a prompt's position). se: the
    `curriculum.se_no_answer` / `se_weighting` options, when not the defaults.
    """
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]

    r, c = cfg.rollout, cfg.curriculum
    return {
        "model": {"path": cfg.model.path, "dtype": cfg.model.dtype, "params": weights_digest(params)},
        "tokenizer": {"name": cfg.model.tokenizer or cfg.model.path, "vocab_size": int(tokenizer.vocab_size),
                      "prompt_tokens": digest([list(map(int, t)) for t in prompt_tokens])},
        "n": int(n), "temperature": float(r.temperature), "top_p": float(r.top_p), "top_k": int(r.top_k),
        "max_new_tokens": int(r.max_new_tokens), "cache_dtype": r.cache_dtype, "seed": int(seed),
        "dataset": digest([[str(x.id), x.problem, x.answer] for x in records]),
        # the SE options only when not the defaults, so files written before they existed stay valid
        **({"se": {"no_answer": c.se_no_answer, "weighting": c.se_weighting}}
           if (c.se_no_answer, c.se_weighting) != ("singleton", "count") else {}),
    }


def read_progress(path) -> tuple[dict | None, dict[str, dict]]:
    """(provenance of the header line or None, {id: SE row}) of a progress JSONL (local or gs://).

    A torn last line is ignored; a file without a header (written before provenance was recorded)
    has provenance None.
    """
    header, done = None, {}
    p = as_path(path, "progress file")
    if not p.exists():
        return header, done
    for i, line in enumerate(p.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if i == 0 and "provenance" in row:
            header = row["provenance"]
        elif "id" in row:
            done[str(row["id"])] = {k: row[k] for k in SE_COLUMNS}
    return header, done


def _provenance_diff(old: dict | None, new: dict) -> str:
    if old is None:
        return "no provenance record (an older entrl)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys)[:400]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def open_progress(path, provenance: dict, *, resume: bool = True) -> dict[str, dict]:
    """The finished rows of the progress file at `path` that can be reused for `provenance`.

    With `resume` and an equal provenance header: its rows. Otherwise (another model, n,
    temperature, dataset, ...; no header; or `resume=False`) the file is moved aside to
    `<path>.stale-<time>` (never deleted: it may be hours of sampling) and a fresh one with this
    header is started; a mismatch is logged in one line. Only process 0 writes, after every process
    has read the file (a barrier), so all of them decide alike.
    """
    path = as_path(path, "progress file")
    exists = path.exists()
    old, done = read_progress(path)
    _barrier("entrl_se_progress_read")
    if exists and resume and old == provenance:
        return done
    primary = jax.process_index() == 0
    if exists:
        if resume:
            log.warning("semantic entropy: %s holds values from other settings (%s); recomputing from scratch",
                        path, _provenance_diff(old, provenance))
        if primary:
            stamp, k = time.strftime("%Y%m%d-%H%M%S"), 0
            stale = path.with_name(f"{path.name}.stale-{stamp}")
            while stale.exists():  # a second change of settings within the same second
                k += 1
                stale = path.with_name(f"{path.name}.stale-{stamp}-{k}")
            path.rename(stale)
            log.info("semantic entropy: moved the old progress file aside to %s", stale.name)
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": PROGRESS_FORMAT, "provenance": provenance}) + "\n")
    _barrier("entrl_se_progress_written")
    return {}


def append_progress(path, rows: list[dict]) -> None:
    """Append finished rows ({"id", *SE_COLUMNS}) to the progress file, opened by name for this write."""
    append_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, *, verifier, out_path,
                     n: int | None = None, batch_prompts: int = 64, mesh=None, seed: int | None = None,
                     resume: bool = True, sampler=None, same_shape: bool = False) -> list[dict]:
    """SE statistics of every prompt from `n` samples of the policy (docs/method.md, "Semantic entropy").

    Samples with the rollout settings of `cfg` (`curriculum.samples` responses per prompt, T and top-p
    of `cfg.rollout`), grades them against the references (for `pass_rate`), clusters the answers
    (`curriculum.se_no_answer`), weighs the classes (`curriculum.se_weighting`) and returns one dict of
    `SE_COLUMNS` per record, aligned with `records`. Progress is appended to
    `out_path` (JSONL: a header line with `se_provenance`, then one row per finished prompt, appended
    per batch), so an interrupted annotation resumes where it stopped and never recomputes finished
    prompts; values computed with other settings are never reused (`open_progress`), nor any with
    `resume=False`. Shows a progress bar (`train.progress`, `entrl.progress`), or else logs prompts
    done, rate and ETA once per batch. `sampler`: the rollout backend
    (`entrl.seams.RolloutBackend` drawing n samples per prompt; default: `build_sampler` of `cfg`, with
    `rollout.slots`). `same_shape`: every call on `batch_prompts` prompts, the last batch padded even when
    it is the only one (one program for the whole annotation).
    """
    n = n or cfg.curriculum.samples
    seed = cfg.train.seed if seed is None else seed
    weighting = cfg.curriculum.se_weighting
    sampler = sampler or build_sampler(cfg, tokenizer, mesh, n=n, slots=cfg.rollout.slots)
    if sampler.config.n != n:
        raise ValueError(f"the sampler draws {sampler.config.n} samples per prompt, the annotation needs n={n}")
    out_path = as_path(out_path, "progress file")  # local or gs://
    done = open_progress(out_path, se_provenance(cfg, params, tokenizer, prompt_tokens, records, n=n, seed=seed),
                         resume=resume)
    todo = [i for i, r in enumerate(records) if str(r.id) not in done]
    if done:
        log.info("semantic entropy: %d of %d prompts already annotated in %s", len(records) - len(todo),
                 len(records), out_path)
    key = jax.random.key(seed + 7919)
    t0 = time.perf_counter()
    primary = jax.process_index() == 0
    with progress_bar(len(records), initial=len(records) - len(todo), desc="semantic entropy", unit="prompt",
                      setting=cfg.train.progress) as bar:
        # Appended by name once per batch (no long-lived handle that could point at a replaced file).
        for b0 in range(0, len(todo), batch_prompts):
            idx = todo[b0:b0 + batch_prompts]
            real = len(idx)
            # Every process samples the same batch; each decodes and grades the rows on its own devices
            # (sample_and_grade gathers the results). Keyed by the prompt's position in `records`, so a
            # resumed run draws the same samples.
            g = sample_and_grade(sampler, graphdef, params, tokenizer, [prompt_tokens[i] for i in idx],
                                 [records[i].answer for i in idx], verifier=verifier,
                                 rng=jax.random.fold_in(key, idx[0]), buckets=cfg.rollout.prompt_buckets,
                                 pad_to=batch_prompts if same_shape or len(todo) > batch_prompts else 0,
                                 seq_logprobs=weighting != "count")
            stats = batch_prompt_stats(_per_prompt(g.answers, n, real), [list(c) for c in g.correct_PxN[:real]],
                                       pairs_equivalent=verifier.equivalent_pairs, no_answer=cfg.curriculum.se_no_answer,
                                       logprobs=None if weighting == "count" else _per_prompt(g.seq_logp, n, real),
                                       lengths=_per_prompt(g.lengths, n, real) if weighting == "likelihood_per_token"
                                       else None)
            for i, st in zip(idx, stats):
                done[str(records[i].id)] = st
            if primary:
                append_progress(out_path, [{"id": str(records[i].id), **st} for i, st in zip(idx, stats)])
            bar.update(real)
            if bar.disable:  # no bar drawn: one log line per batch instead
                finished = min(b0 + batch_prompts, len(todo))
                rate = finished / max(time.perf_counter() - t0, 1e-9)
                log.info("semantic entropy: %d/%d prompts (%.1f prompts/s, ETA %.0f s)", len(records) - len(todo)
                         + finished, len(records), rate, (len(todo) - finished) / max(rate, 1e-9))
    return [done[str(r.id)] for r in records]


def _per_prompt(rows, n: int, prompts: int) -> list[list]:
    """The first `prompts` prompts' groups of n consecutive rows."""
    return [list(rows[j * n:(j + 1) * n]) for j in range(prompts)]


def plot_se_histogram(se_values: Sequence[float], path, *, bins: int = 30) -> None:
    """Histogram PNG of per-prompt semantic entropy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (matplotlib: only for the plot)
    from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib: only for the plot)

    # A bare Figure on the Agg canvas: no pyplot state, no backend switch (inline notebooks keep theirs).
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(np.asarray(se_values, float), bins=bins, color="#4c72b0")
    ax.set_xlabel("semantic entropy (nats)")
    ax.set_ylabel("prompts")
    ax.set_title(f"Semantic entropy of {len(se_values)} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
