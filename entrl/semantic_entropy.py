"""Semantic entropy of a prompt's sampled final answers (docs/method.md, "Semantic entropy of a prompt").

SE(q) = -sum_k p_k ln p_k over the semantic classes C_k of the N sampled
answers, in nats. Low SE: the model answers consistently; high SE: many
different answers. It orders SENT's curriculum and is cheap to refresh online
from the training rollouts themselves.

Design decisions:
- Clustering is greedy against class representatives, in sample order: each
  answer is compared with the first member of every existing class; it joins
  every class it matches (union-find merges them, so classes are transitive
  even though pairwise verification is not) or founds a new class. Class ids
  are 0..C-1 in order of first appearance.
- Equivalence is the one used for rewards (`entrl.rewards`): identical
  normalised strings join without any call; other pairs go through
  `answers_equivalent` in BOTH directions, because math-verify's `verify` is
  asymmetric (`(1,2)` vs `1<x<2`).
- Pair checks are batched through a `pairs_equivalent(list of pairs) -> bools`
  hook. The default runs in this process (no timeout: fine for trusted or
  already-extracted answers); pass `Verifier.equivalent_pairs` to run them in
  the verifier pool with timeouts. `cluster_answer_groups` clusters many
  prompts in lockstep, so one batch holds the comparisons of all prompts.
- A missing answer (None) is never compared: it is its own singleton class by
  default, or all missing answers share one class (`no_answer="shared"`).
- Probabilities are count-based (p_k = |C_k| / N) or, with sequence
  log-probs, likelihood-weighted (p_k proportional to sum_{i in C_k} exp(lp_i),
  via logsumexp; with `lengths`, lp_i / len_i, i.e. per-token geometric mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from entrl.rewards import answers_equivalent_both, normalize_answer

PairsEquivalent = Callable[[Sequence[tuple[str, str]]], Sequence[bool]]
NO_ANSWER_MODES = ("singleton", "shared")


def _in_process_pairs(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    return [answers_equivalent_both(a, b) for a, b in pairs]


class _Group:
    """Clustering state of one prompt's answers: union-find plus class representatives."""

    def __init__(self, answers: Sequence[str | None], no_answer: str):
        self.answers = list(answers)
        self.parent = list(range(len(answers)))
        self.reps: list[int] = []  # first member of each live class, by creation order
        self.by_norm: dict[str, int] = {}
        self.first_missing: int | None = None
        self.shared_missing = no_answer == "shared"
        self.pos = 0

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def advance(self) -> int | None:
        """Settle answers that need no comparison; return the next one that does (or None: done)."""
        while self.pos < len(self.answers):
            i, a = self.pos, self.answers[self.pos]
            if a is None:
                if self.shared_missing:
                    if self.first_missing is None:
                        self.first_missing = i
                    else:
                        self.union(self.first_missing, i)
                self.pos += 1
                continue
            norm = normalize_answer(a)
            if norm in self.by_norm:
                self.union(self.by_norm[norm], i)
                self.pos += 1
                continue
            self.by_norm[norm] = i
            if not self.reps:
                self.reps.append(i)
                self.pos += 1
                continue
            return i
        return None

    def settle(self, i: int, matches: Sequence[bool]) -> None:
        """Apply the comparisons of answer i with the current representatives (same order)."""
        matched = [r for r, m in zip(self.reps, matches, strict=True) if m]
        if not matched:
            self.reps.append(i)
        else:
            for r in matched:
                self.union(r, i)
            merged = set(matched[1:])
            self.reps = [r for r in self.reps if r not in merged]
        self.pos += 1

    def class_ids(self) -> list[int]:
        ids: dict[int, int] = {}
        return [ids.setdefault(self.find(i), len(ids)) for i in range(len(self.answers))]


def cluster_answer_groups(
    groups: Sequence[Sequence[str | None]],
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[list[int]]:
    """`cluster_answers` for many prompts at once; each round batches one comparison set per prompt."""
    if no_answer not in NO_ANSWER_MODES:
        raise ValueError(f"no_answer={no_answer!r}: expected one of {NO_ANSWER_MODES}")
    check = pairs_equivalent or _in_process_pairs
    states = [_Group(answers, no_answer) for answers in groups]
    active = states
    while active:
        asks = [(g, g.advance()) for g in active]
        asks = [(g, i) for g, i in asks if i is not None]
        pairs = [(g.answers[i], g.answers[r]) for g, i in asks for r in g.reps]
        decisions = list(check(pairs)) if pairs else []
        if len(decisions) != len(pairs):
            raise ValueError(f"pairs_equivalent returned {len(decisions)} decisions for {len(pairs)} pairs")
        at = 0
        for g, i in asks:
            n = len(g.reps)
            g.settle(i, decisions[at : at + n])
            at += n
        active = [g for g, _ in asks]
    return [g.class_ids() for g in states]


def cluster_answers(
    answers: Sequence[str | None],
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[int]:
    """Semantic class id (0..C-1, first-appearance order) of each answer.

    Equivalent answers (normalised-string match, else math-verify in both
    directions) share a class; None answers are singletons (`no_answer=
    "singleton"`) or one shared class (`"shared"`).
    """
    return cluster_answer_groups([answers], no_answer=no_answer, pairs_equivalent=pairs_equivalent)[0]


def entropy_of_classes(
    class_ids: Sequence[int],
    *,
    logprobs: Sequence[float] | None = None,
    lengths: Sequence[int] | None = None,
) -> float:
    """-sum_k p_k ln p_k (nats) of a clustering; count-based or likelihood-weighted.

    logprobs: sequence log-probabilities, one per answer (finite); then
    p_k = sum_{i in C_k} exp(lp_i) / sum_i exp(lp_i), computed in log space.
    lengths: response lengths in tokens; each lp_i is divided by its length first.
    """
    ids = np.asarray(class_ids, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("semantic entropy of an empty answer set is undefined")
    n_classes = int(ids.max()) + 1
    if logprobs is None:
        if lengths is not None:
            raise ValueError("lengths only apply to likelihood weighting: pass logprobs too")
        p = np.bincount(ids, minlength=n_classes) / ids.size
        log_p = np.log(p)
    else:
        lp = np.asarray(logprobs, dtype=np.float64)
        if lp.shape != ids.shape or not np.all(np.isfinite(lp)):
            raise ValueError(f"logprobs must be {ids.size} finite values, got shape {lp.shape}")
        if lengths is not None:
            ln = np.asarray(lengths, dtype=np.float64)
            if ln.shape != ids.shape or np.any(ln <= 0):
                raise ValueError(f"lengths must be {ids.size} positive values")
            lp = lp / ln
        # class log-mass: logsumexp over members, shifted by the global max for stability
        shift = lp.max()
        mass = np.zeros(n_classes)
        np.add.at(mass, ids, np.exp(lp - shift))
        with np.errstate(divide="ignore"):  # a class whose mass underflows has p = 0
            log_p = np.log(mass) - np.log(mass.sum())
        p = np.exp(log_p)
    se = -float(np.sum(p[p > 0] * log_p[p > 0]))
    return max(se, 0.0) + 0.0  # + 0.0 turns a -0.0 (one class) into 0.0


def semantic_entropy(
    answers: Sequence[str | None],
    *,
    logprobs: Sequence[float] | None = None,
    no_answer: str = "singleton",
    lengths: Sequence[int] | None = None,
    pairs_equivalent: PairsEquivalent | None = None,
) -> float:
    """Semantic entropy (nats) of one prompt's sampled answers; see the module docstring."""
    ids = cluster_answers(answers, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    return entropy_of_classes(ids, logprobs=logprobs, lengths=lengths)


def stats_from_classes(class_ids: Sequence[int], references_correct: Sequence[bool] | None = None) -> dict:
    """Per-prompt record: se, se_norm (SE / ln N; 0 when N == 1), n_classes, class_sizes, pass_rate."""
    n = len(class_ids)
    se = entropy_of_classes(class_ids)
    sizes = sorted(np.bincount(np.asarray(class_ids, dtype=np.int64)).tolist(), reverse=True)
    if references_correct is not None and len(references_correct) != n:
        raise ValueError(f"{len(references_correct)} correctness flags for {n} answers")
    return {
        "se": se,
        "se_norm": se / math.log(n) if n > 1 else 0.0,
        "n_classes": len(sizes),
        "class_sizes": sizes,
        "pass_rate": None if references_correct is None else float(np.mean(references_correct)),
    }


def prompt_stats(
    answers: Sequence[str | None],
    references_correct: Sequence[bool] | None = None,
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> dict:
    """Count-based SE record of one prompt (the columns of `entrl semantic-entropy`)."""
    ids = cluster_answers(answers, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    return stats_from_classes(ids, references_correct)


def batch_prompt_stats(
    groups: Sequence[Sequence[str | None]],
    references_correct: Sequence[Sequence[bool]] | None = None,
    *,
    no_answer: str = "singleton",
    pairs_equivalent: PairsEquivalent | None = None,
) -> list[dict]:
    """`prompt_stats` for many prompts, with their comparisons batched (pass a pool's hook)."""
    all_ids = cluster_answer_groups(groups, no_answer=no_answer, pairs_equivalent=pairs_equivalent)
    corrects = references_correct if references_correct is not None else [None] * len(groups)
    return [stats_from_classes(ids, c) for ids, c in zip(all_ids, corrects, strict=True)]


# ---------------------------------------------------------------------------
# Dataset annotation with a policy (`entrl semantic-entropy`, and the trainer before a curriculum run)
# ---------------------------------------------------------------------------

SE_COLUMNS = ("se", "se_norm", "n_classes", "class_sizes", "pass_rate")
PROGRESS_FORMAT = 1  # version of the progress file's header line


def se_provenance(cfg, params, tokenizer, prompt_tokens, records, *, n: int, seed: int) -> dict:
    """What an annotation's values depend on: cached values are reused only when all of it is equal.

    model: `model.path`, its dtype and a fingerprint of the parameter values themselves (the
    checkpoint's `fingerprint_leaves`: two runs of the same weights agree wherever they were loaded
    from; a fine-tuned or re-initialised model never does). tokenizer: its name and size, plus a
    hash of the prompt tokens (which also covers the prompt suffix and chat template). Sampling: n,
    temperature, top-p, top-k, max new tokens, KV-cache dtype, seed. dataset: a hash of every
    record's (id, problem, answer) in order (sample keys depend on a prompt's position).
    """
    import hashlib
    import json

    from entrl.checkpoint import fingerprint_leaves

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]

    r = cfg.rollout
    return {
        "model": {"path": cfg.model.path, "dtype": cfg.model.dtype, "params": digest(fingerprint_leaves(params))},
        "tokenizer": {"name": cfg.model.tokenizer or cfg.model.path, "vocab_size": int(tokenizer.vocab_size),
                      "prompt_tokens": digest([list(map(int, t)) for t in prompt_tokens])},
        "n": int(n), "temperature": float(r.temperature), "top_p": float(r.top_p), "top_k": int(r.top_k),
        "max_new_tokens": int(r.max_new_tokens), "cache_dtype": r.cache_dtype, "seed": int(seed),
        "dataset": digest([[str(x.id), x.problem, x.answer] for x in records]),
    }


def _read_progress(path) -> tuple[dict | None, dict[str, dict]]:
    """(provenance of the header line or None, {id: SE row}) of a progress JSONL (local or gs://).

    A torn last line is ignored; a file without a header (written before provenance was recorded)
    has provenance None.
    """
    import json

    from entrl.rundir import as_path

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


def _read_done(path) -> dict[str, dict]:
    """Rows already annotated in a progress JSONL (a torn last line is ignored)."""
    return _read_progress(path)[1]


def _provenance_diff(old: dict | None, new: dict) -> str:
    if old is None:
        return "no provenance record (an older entrl)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys)[:400]


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def open_progress(path, provenance: dict, *, resume: bool = True) -> dict[str, dict]:
    """The finished rows of the progress file at `path` that can be reused for `provenance`.

    With `resume` and an equal provenance header: its rows. Otherwise (another model, n,
    temperature, dataset, ...; no header; or `resume=False`) the file is moved aside to
    `<path>.stale-<time>` (never deleted: it may be hours of sampling) and a fresh one with this
    header is started; a mismatch is logged in one line. Only process 0 writes, after every process
    has read the file (a barrier), so all of them decide alike.
    """
    import json
    import logging
    import time

    import jax

    from entrl.rundir import as_path

    log = logging.getLogger("entrl.semantic_entropy")
    path = as_path(path, "progress file")
    exists = path.exists()
    old, done = _read_progress(path)
    _barrier("entrl_se_progress_read")
    if exists and resume and old == provenance:
        return done
    primary = jax.process_index() == 0
    if exists:
        if resume:
            log.warning("semantic entropy: %s holds values from other settings (%s); recomputing from scratch",
                        path, _provenance_diff(old, provenance))
        if primary:
            stale = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(stale)
            log.info("semantic entropy: moved the old progress file aside to %s", stale.name)
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": PROGRESS_FORMAT, "provenance": provenance}) + "\n")
    _barrier("entrl_se_progress_written")
    return {}


def append_progress(path, rows: list[dict]) -> None:
    """Append finished rows ({"id", *SE_COLUMNS}) to the progress file, opened by name for this write."""
    import json

    from entrl.rundir import append_text

    append_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def annotate_prompts(cfg, graphdef, params, tokenizer, prompt_tokens, records, *, verifier, out_path,
                     n: int | None = None, batch_prompts: int = 64, mesh=None, seed: int | None = None,
                     resume: bool = True) -> list[dict]:
    """SE statistics of every prompt from `n` samples of the policy (docs/method.md, "Semantic entropy").

    Samples with the rollout settings of `cfg` (`curriculum.samples` responses per prompt, T and top-p
    of `cfg.rollout`), grades them against the references (for `pass_rate`), clusters the answers and
    returns one dict of `SE_COLUMNS` per record, aligned with `records`. Progress is appended to
    `out_path` (JSONL: a header line with `se_provenance`, then one row per finished prompt, appended
    per batch), so an interrupted annotation resumes where it stopped and never recomputes finished
    prompts; values computed with other settings are never reused (`open_progress`), nor any with
    `resume=False`. Shows a progress bar (`train.progress`, `entrl.progress`), or else logs prompts
    done, rate and ETA once per batch.
    """
    import logging
    import time

    import jax

    from entrl.rundir import as_path

    from entrl.evaluation import sample_and_grade
    from entrl.progress import progress_bar
    from entrl.rl.setup import build_sampler

    log = logging.getLogger("entrl.semantic_entropy")
    n = n or cfg.curriculum.samples
    seed = cfg.train.seed if seed is None else seed
    sampler = build_sampler(cfg, tokenizer, mesh, n=n)
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
                                 pad_to=batch_prompts if len(todo) > batch_prompts else 0)  # the last one padded
            groups = [g.answers[j * n:(j + 1) * n] for j in range(real)]
            corr = [list(g.correct_PxN[j]) for j in range(real)]
            stats = batch_prompt_stats(groups, corr, pairs_equivalent=verifier.equivalent_pairs)
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


def plot_se_histogram(se_values: Sequence[float], path, *, bins: int = 30) -> None:
    """Histogram PNG of per-prompt semantic entropy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def annotate_cli(cfg, *, data: str, out: str, n: int | None = None, resume: bool = True) -> None:
    """`entrl semantic-entropy`: annotate a dataset with the policy of `cfg.model` and write it out.

    Writes `out` (.jsonl or .parquet: the input columns plus `SE_COLUMNS`), `<out>.se_hist.png` and
    `<out>.provenance.json` (what the values were computed with: `se_provenance`). Progress lives in
    `<out>.progress.jsonl`; rerunning the same command resumes from it, unless the settings changed
    or `resume=False` (`--no-resume`): then the old progress is moved aside and everything is sampled
    again. `out` may be a gs:// path (the outputs are written locally, then uploaded).
    """
    import dataclasses
    import json
    import os
    from pathlib import Path

    from entrl.data.sources import write_records
    from entrl.rl.setup import build_mesh, build_model, build_records, build_tokenizer, build_verifier, tokenize
    from entrl.rundir import as_path, local_copy_for_upload

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=data))
    out_p = as_path(out, "--out")
    if out_p.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--out {out!r}: must end in .jsonl or .parquet")
    mesh = build_mesh(cfg)
    tokenizer = build_tokenizer(cfg)
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
    with local_copy_for_upload(out_p.parent) as local_dir:
        local = Path(os.fspath(local_dir)) / out_p.name
        write_records(local, rows)
        plot_se_histogram([s["se"] for s in stats], local.with_name(local.name + ".se_hist.png"))
        local.with_name(local.name + ".provenance.json").write_text(json.dumps(
            {"provenance": _read_progress(progress)[0], "data": data, "prompts": len(rows)}, indent=2) + "\n")
    print(f"wrote {len(rows)} annotated prompts to {out_p}")
