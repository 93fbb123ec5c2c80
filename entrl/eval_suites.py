"""`entrl eval`: the six evaluation suites (benchmarks) -> samples.jsonl (resumable) -> results.json / results.md

(Named apart from the repository's top-level `benchmarks/`, which holds performance scripts.)

Design decisions:
- Every sample is one line of `<out>/samples.jsonl`, appended and flushed after each sampler call
  (one batch of problems). The metrics are computed from that file alone, so an interrupted run
  resumes by skipping the problems whose n samples are all there, and a finished run is re-summarised
  (other k, other benchmark subsets) without sampling. A torn last line, or a problem with fewer than n
  samples (deleted lines), is removed from the file and that problem is sampled again.
- The settings that change what a sample means (model path and a fingerprint of its weights,
  tokenizer, n, temperature, top_p, max_new_tokens, seed, dtype, prompt) go to `<out>/run.json` on the
  first run; resuming with other ones is an error, and so is a run.json without the fingerprint (older
  entrl: its samples cannot be matched to the weights). The weights are read even when every sample is
  on disk, since a run's `policy/` changes as it trains on. Benchmarks, k, batch size and max_problems
  may change between runs.
- Sampling keys are fold_in(key(seed), crc32(benchmark), index of the batch's first problem), not a
  counter of the run's history: a resumed batch holding the same problems as a batch of the
  interrupted run (same batch size, stopped at a batch boundary) draws exactly the same samples.
- Grading is `entrl.rewards.Verifier`, the training reward (one implementation). Reference answers
  math-verify only reads as a plain string, several answers, tuples/intervals, equations and
  inequalities, decimals and `4.5e33`-style numbers are listed under `flagged` in results.json with
  their accuracy (`answer_format_flags`); they are graded like every other problem, never dropped.
- Averages over benchmarks are unweighted means of the per-benchmark numbers (the paper's "Average").
- Driven by a run config like every other command: `eval.*` (benchmarks, n, k, temperature, top_p,
  max_new_tokens, batch_problems, cache_dtype, seed), `model.*` (path, tokenizer, compute dtype: the
  weights are loaded in it, half the bytes of float32 masters under bfloat16), `mesh.*` (the model is
  placed on the mesh; each sampler call's rows are split over the data shards), `data.*` (chat
  template, prompt suffix) and `rollout.prompt_buckets`. `eval.batch_problems=0` sizes the batch from
  the memory plan on an accelerator (`entrl.plan.auto_eval_batch`).
- Multi-host (`launch/`): every process runs the same loop; each decodes and grades the rows its own
  devices hold (`entrl.evaluation.sample_and_grade`), process 0 alone writes samples.jsonl, run.json
  and the results: one results file, resumable like a single-process run.
Left out on purpose: tolerance grading of rounded physics answers and LLM judges (plug in through
`verifier=`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from entrl import hub, plan
from entrl.build import build_tokenizer, check_tokenizer_fits, maybe_initialize_distributed, resolve_model_dir
from entrl.checkpoint import weights_digest
from entrl.config import ConfigError
from entrl.data.sources import Record, load_records, names_hub_dataset, number_text
from entrl.data.tasks import tokenize_prompts
from entrl.evaluation import _check_k, sample_and_grade, summarize
from entrl.models import CheckpointFilesError, ModelConfig, load_pretrained
from entrl.multihost import gather_json
from entrl.progress import progress_bar
from entrl.rewards import Verifier, _parse, is_pathological
from entrl.rundir import READ_SCHEMES, append_text, as_path, is_model_dir, is_run_dir, write_text_whole
from entrl.sampling import FINISH_REASONS, Sampler, SamplingConfig, cache_dtype
from entrl.semantic_entropy import PairsEquivalent
from entrl.sharding import data_shards, make_mesh

log = logging.getLogger(__name__)

# Settings that must not change when an evaluation directory is resumed (see run.json).
RESUME_KEYS = ("model", "weights", "tokenizer", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
               "dtype", "cache_dtype", "chat_template", "prompt_suffix", "equivalent", "timeout_s")
# What a run.json of an entrl that did not record a setting used (its samples stay resumable).
_UNRECORDED = {"top_k": 0, "equivalent": "", "timeout_s": 5.0}
# The keys every row of samples.jsonl has (what the tables are computed from).
_ROW_KEYS = ("benchmark", "id", "sample", "reference", "answer", "correct", "status", "finish_reason", "length")


def problem_digest(rec: Record) -> str:
    """A short digest of a problem's prompt and reference answer, kept in each of its sample rows: a resumed
    evaluation never grades samples of another problem that has the same id (an edited or reordered file)."""
    return hashlib.sha256(json.dumps([rec.prompt, rec.answer], ensure_ascii=False).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class BenchmarkSource:
    """Where a named benchmark lives on the Hugging Face hub, and which columns hold what."""

    label: str  # name in the tables (the paper's spelling)
    hub_id: str  # dataset id for `datasets.load_dataset`
    split: str  # split holding the problems
    problem_key: str  # column with the problem text
    answer_key: str  # column with the reference answer (a list is joined with ", ", `$` removed)
    id_key: str = ""  # column with a problem id ("" or missing in a row: the row index)


# The hub ids and columns follow their dataset cards as of 2025; they are NOT exercised offline (tests
# and CI pass `data_dir`: a directory of <name>.jsonl files, e.g. from `entrl data prepare-benchmarks`).
BENCHMARKS: dict[str, BenchmarkSource] = {
    "aime24": BenchmarkSource("AIME24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
    "aime25": BenchmarkSource("AIME25", "yentinglin/aime_2025", "train", "problem", "answer", "id"),
    "amc23": BenchmarkSource("AMC23", "math-ai/amc23", "test", "question", "answer", "id"),
    "math500": BenchmarkSource("MATH500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
    "minerva": BenchmarkSource("Minerva", "math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": BenchmarkSource("OlympiadBench", "math-ai/olympiadbench", "test", "question", "final_answer",
                                     "id"),
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    key: str  # name in samples.jsonl / results.json (a named benchmark, a file stem, or a hub id)
    label: str  # name in results.md
    records: list  # `entrl.data.sources.Record`s, in file order


def _answer_text(value: Any) -> str:
    """A hub answer cell as a reference string: lists joined with ", ", numbers exactly as written
    (`number_text`: 27.0 -> "27", 1e23 -> "1" and 23 zeros), no `$`."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_answer_text(v) for v in value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = number_text(value)
    return str(value).replace("$", "").strip().rstrip(".").strip()


def _hub_records(src: BenchmarkSource) -> list:
    try:
        ds = hub.load_dataset(src.hub_id, split=src.split)
    except Exception as e:  # datasets raises many types (connection, not found, offline mode, ...)
        raise ValueError(f"could not load {src.hub_id!r} (split {src.split!r}) from the hub: {e}") from e
    missing = [k for k in (src.problem_key, src.answer_key) if k not in ds.column_names]
    if missing:
        raise ValueError(f"{src.hub_id}: columns {missing} not found; available: {ds.column_names}")
    records = []
    for i, row in enumerate(ds):
        rid = row.get(src.id_key) if src.id_key else None
        problem, answer = str(row[src.problem_key] or "").strip(), _answer_text(row[src.answer_key])
        if not problem or not answer:
            raise ValueError(f"{src.hub_id} row {i}: empty problem or answer")
        records.append(Record(str(i if rid in (None, "") else rid), problem, answer, {}))
    if len({r.id for r in records}) != len(records):  # ids must key samples.jsonl: fall back to row indices
        records = [Record(str(i), r.problem, r.answer, {}) for i, r in enumerate(records)]
    return records


def _file_records(source) -> list:
    """Records of a file or hub id with columns problem/answer, and id when there is one (else the row index)."""
    try:
        return load_records(source).records
    except ValueError as e:
        if "(id_key) not found" not in str(e):
            raise
    return load_records(source, id_key="").records


def load_benchmark(name: str, *, data_dir: str | None = None, max_problems: int = 0,
                   dir_option: str = "eval.data_dir") -> Benchmark:
    """A named benchmark (`BENCHMARKS`) or file stem: `<data_dir>/<name>.jsonl` (a `BENCHMARKS` name must be
    there when data_dir is given), else a named benchmark's hub dataset; or any JSONL/Parquet path or hub id
    with columns `problem`/`answer` (and `id` when present).

    Every failure is a one-line ConfigError; `dir_option` is what sets data_dir in the caller (a flag or key,
    named in the hints; "" = the caller has none).
    """
    if max_problems < 0:
        raise ConfigError(f"max_problems={max_problems}: must be >= 0 (0 = all)")
    src = BENCHMARKS.get(name)
    root = path = None
    if data_dir:
        where = f"{dir_option or 'the benchmark directory'} is {str(data_dir)!r}"
        root = as_path(data_dir, dir_option or "data_dir", schemes=READ_SCHEMES)  # local or gs://
        if not root.is_dir():
            raise ConfigError(f"{where}: no such directory (give one holding <benchmark>.jsonl files)")
        path = root / f"{name}.jsonl"
        if not path.is_file():
            if src is not None:
                raise ConfigError(f"benchmark {name!r}: {path} not found ({where})")
            path = None
    try:
        if path is not None:
            records = _file_records(path)
        elif src is not None:
            records = _hub_records(src)
        else:
            records = _file_records(name)
    except (ValueError, ImportError) as e:
        msg = str(e) if str(e).startswith(name) else f"benchmark {name!r}: {e}"
        hint = ""
        if "(problem_key) not found" in msg or "(answer_key) not found" in msg:
            hint = "; a benchmark file needs the columns problem and answer (and id, optional)"
        if path is None and (src is not None or names_hub_dataset(name)):
            if root is not None:
                hint += f"; there is no {root / (name + '.jsonl')} either"
            elif dir_option:
                hint += (f"; give {dir_option} a directory of <benchmark>.jsonl files instead (`entrl data "
                        "prepare-benchmarks` writes them where the hub is reachable)")
            if src is None:
                hint += f" (built-in benchmarks: {', '.join(BENCHMARKS)})"
        raise ConfigError(f"{msg}{hint}") from None
    if path is not None or src is not None:
        key, label = name, src.label if src is not None else name
    else:
        key = Path(name).stem if Path(name).exists() else name
        label = key
    return Benchmark(key, label, list(records[:max_problems] if max_problems else records))


def answer_format_flags(answer: str) -> list[str]:
    """Why a reference answer is hard to grade by rule; [] for an ordinary one.

    Reads the answer with the reward code's own parser (`entrl.rewards._parse`, LaTeX only):
    `plain_string` (no sympy object: compared as a string), `multiple_answers` (a set of several),
    `tuple_or_interval`, `equation`, `inequality`, `decimal` (often rounded: exact grading is strict),
    `e_notation` (`4.5e33`: LaTeX reads `e` as Euler's number; only the rational fast path gets it
    right), `text` (`\\text{..}`: words or units), `pathological` / `unparseable`.
    """
    import sympy  # noqa: PLC0415 (seconds to import; only for this check)

    if is_pathological(answer):
        return ["pathological"]
    try:
        objs = [x for x in _parse(answer) if not isinstance(x, str)]
    except Exception:
        return ["unparseable"]
    if not objs:
        return ["plain_string"]
    obj = objs[0]
    items = list(obj.args) if isinstance(obj, sympy.FiniteSet) else [obj]
    flags = []
    if isinstance(obj, sympy.FiniteSet) and len(items) > 1:
        flags.append("multiple_answers")
    if any(isinstance(x, (sympy.Tuple, sympy.Interval, sympy.Union)) for x in items):
        flags.append("tuple_or_interval")
    if any(isinstance(x, sympy.Equality) for x in items):
        flags.append("equation")
    elif any(isinstance(x, sympy.core.relational.Relational) for x in items):
        flags.append("inequality")
    if re.search(r"\d[eE][+-]?\d", answer):
        flags.append("e_notation")
    elif any(isinstance(x, sympy.Basic) and x.atoms(sympy.Float) for x in items):
        flags.append("decimal")
    if "\\text" in answer:
        flags.append("text")
    return flags


# -- samples.jsonl and run.json ---------------------------------------------


def _read_samples(path, n: int) -> dict[tuple[str, str], list[dict]]:
    """Complete problems of samples.jsonl: (benchmark, id) -> its n sample rows in sample order.

    A torn last line (no newline: the run died mid-write) and problems with fewer than n samples are
    removed from the file (atomically, by process 0; every process reads the same complete problems) so
    that they can be appended again without duplicates. A line that is not a sample row is a ConfigError.
    """
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for lineno, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in _ROW_KEYS if k not in row]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
            key, j = (str(row["benchmark"]), str(row["id"])), int(row["sample"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} line {lineno}: not a sample row of entrl eval ({e}); fix or delete the "
                              "line, or use another --out") from None
        groups.setdefault(key, {})[j] = row
    complete = {k: [g[j] for j in range(n)] for k, g in groups.items() if set(g) == set(range(n))}
    partial = len(groups) - len(complete)
    if (torn or partial) and jax.process_index() == 0:
        logging.getLogger(__name__).warning("%s: dropping %d problems with fewer than %d samples%s; they are "
                                            "sampled again", path, partial, n, " and a torn last line" if torn else "")
        write_text_whole(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for rows in complete.values()
                                       for r in rows))
    return complete


def _check_same_problems(suites: Sequence[Benchmark], done: dict, out) -> None:
    """ConfigError when samples on disk were drawn for another problem or graded against another reference
    than the benchmark's problem of that id now (the file was edited, reordered, or is another file of the
    same name). Rows of an entrl that kept no digest are matched by their reference answer."""
    for s in suites:
        for r in s.records:
            rows = done.get((s.key, r.id))
            if rows is None:
                continue
            stored = rows[0].get("problem_digest")
            if rows[0]["reference"] != r.answer or (stored is not None and stored != problem_digest(r)):
                raise ConfigError(f"{out}: the samples of benchmark {s.key!r} problem {r.id!r} were drawn for another "
                                  f"problem or reference answer than its file has now ({rows[0]['reference']!r} on "
                                  f"disk vs {r.answer!r} now); use another --out or delete samples.jsonl")


def _settings_diff(key: str, old: Any, new: Any, recorded: bool = True) -> str:
    if not recorded:  # run.json of an entrl that did not record it: the value it used then
        return f"{key}: not recorded on disk (an older entrl, which used {old!r}) vs {new!r} now"
    if key != "weights":
        return f"{key}: {old!r} on disk vs {new!r} now"
    if old is None:  # run.json of an entrl that did not record the weights: they cannot be matched
        return "weights: no fingerprint on disk (samples from an older entrl), so not known to be this model's"
    return f"weights: fingerprint {old} on disk vs {new} now, so the model changed"


def _check_run_settings(out, settings: dict, have_samples: bool, *, write: bool = True) -> None:
    """Write run.json (`write`), or compare the `RESUME_KEYS` in `settings` with the one there; a mismatch
    with samples on disk is an error."""
    path = out / "run.json"
    if have_samples and not path.exists():
        raise ConfigError(f"{out} holds samples.jsonl but no run.json (what they were drawn with), so they cannot "
                          "be matched to this model and settings; use another --out or delete samples.jsonl")
    if path.exists() and have_samples:
        try:
            old = json.loads(path.read_text()).get("settings", {})
            if not isinstance(old, dict):
                raise ValueError("its settings are not a mapping")
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: not a run.json of entrl eval ({e}); use another --out") from None
        recorded = set(old)
        old = {**_UNRECORDED, **old}
        diff = {k: (old.get(k), settings[k]) for k in RESUME_KEYS if k in settings and old.get(k) != settings[k]}
        if diff:
            lines = ", ".join(_settings_diff(k, a, b, k in recorded or k not in _UNRECORDED)
                              for k, (a, b) in diff.items())
            raise ConfigError(f"{out} holds samples drawn with other settings ({lines}); use another --out "
                             "or delete its samples.jsonl")
        return
    if write and jax.process_index() == 0:  # whole: other processes may read it at once
        write_text_whole(path, json.dumps({"settings": settings}, indent=2) + "\n")


def _prompt_tokens(bench: Benchmark, tokenizer, buckets: Sequence[int], *, suffix: str,
                   chat_template: bool) -> list[list[int]]:
    """Prompt tokens of every problem; ConfigError when one does not encode or is longer than the largest
    prompt bucket (evaluation never drops a problem)."""
    try:
        tokens = tokenize_prompts(bench.records, tokenizer, max_prompt_len=sys.maxsize, on_long_prompt="error",
                                  suffix=suffix, chat_template=chat_template).tokens
    except ValueError as err:
        raise ConfigError(f"benchmark {bench.key!r} {err}") from None
    i = max(range(len(tokens)), key=lambda j: len(tokens[j]))
    if len(tokens[i]) > max(buckets):
        raise ConfigError(f"benchmark {bench.key!r} problem {bench.records[i].id!r}: its prompt has {len(tokens[i])} "
                          f"tokens, more than the largest of rollout.prompt_buckets={list(buckets)}; add a bucket of at "
                          f"least {len(tokens[i])}")
    return tokens


def _check_context(model_dir, prompts: dict, buckets: Sequence[int], max_new_tokens: int) -> None:
    """ConfigError when the longest prompt's bucket plus the response budget exceeds the model's context.

    Checked from config.json before any weight is read or anything compiled.
    """
    longest = max((len(t) for tokens in prompts.values() for t in tokens), default=0)
    bucket = min((b for b in buckets if b >= longest), default=max(buckets))
    context = ModelConfig.from_pretrained(model_dir).max_position_embeddings
    if bucket + max_new_tokens > context:
        raise ConfigError(f"eval.max_new_tokens={max_new_tokens} + the longest prompt's bucket {bucket} = "
                          f"{bucket + max_new_tokens} tokens exceeds the model's context of {context} tokens "
                          "(max_position_embeddings); lower eval.max_new_tokens (--max-new-tokens)")


# -- metrics and tables -------------------------------------------------------


def benchmark_metrics(rows_by_problem: Sequence[Sequence[dict]], ks: Sequence[int], *,
                      pairs_equivalent: PairsEquivalent | None = None) -> dict[str, Any]:
    """avg@k / pass@k / maj@k (`summarize`), mean response length, truncation rate and status counts
    of one benchmark, from its sample rows ([problem][sample] dicts of samples.jsonl)."""
    correct = np.array([[bool(r["correct"]) for r in rows] for rows in rows_by_problem], bool)
    answers = [[r["answer"] for r in rows] for rows in rows_by_problem]
    flat = [r for rows in rows_by_problem for r in rows]
    out: dict[str, Any] = dict(summarize(correct, answers, ks, pairs_equivalent=pairs_equivalent))
    out["response_length"] = float(np.mean([r["length"] for r in flat]))
    out["truncation_rate"] = float(np.mean([r["finish_reason"] == "length" for r in flat]))
    statuses = [r["status"] for r in flat]
    out["status_counts"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return out


def average_metrics(per_benchmark: dict[str, dict], ks: Sequence[int]) -> dict[str, float]:
    """Unweighted mean over benchmarks of every metric (the paper's "Average" rows)."""
    names = [f"{m}@{k}" for m in ("avg", "pass", "maj") for k in ks] + ["response_length", "truncation_rate"]
    return {m: float(np.mean([b[m] for b in per_benchmark.values()])) for m in names}


def results_markdown(results: dict) -> str:
    """The paper-style table (rows benchmark x metric, columns k; values in %) plus a length/truncation table."""
    ks = results["ks"]
    head = "| Benchmark | Metric | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 2)]
    blocks = [(b["label"], b) for b in results["benchmarks"].values()] + [("Average", results["average"])]
    for label, m in blocks:
        for i, metric in enumerate(("avg", "pass", "maj")):
            name = f"**{label}**" if label == "Average" else label
            cells = " | ".join(f"{100 * m[f'{metric}@{k}']:.2f}" for k in ks)
            lines.append(f"| {name if i == 0 else ''} | {metric}@k | {cells} |")
    lines += ["", "| Benchmark | problems | n | mean response tokens | truncated % | flagged answers |",
              "|---|---|---|---|---|---|"]
    for b in results["benchmarks"].values():
        lines.append(f"| {b['label']} | {b['problems']} | {b['n']} | {b['response_length']:.1f} | "
                     f"{100 * b['truncation_rate']:.2f} | {len(b['flagged'])} |")
    a = results["average"]
    lines.append(f"| **Average** | | | {a['response_length']:.1f} | {100 * a['truncation_rate']:.2f} | |")
    return "\n".join(lines) + "\n"


# -- the command --------------------------------------------------------------


def _sample_benchmark(bench: Benchmark, prompts: list[list[int]], todo: list[int], *, sampler, graphdef, params,
                      tokenizer, verifier, key, batch_size: int, buckets, samples_file, progress: str = "off") -> None:
    """Sample and grade the `todo` problems of one benchmark, appending each batch to samples_file.

    Shows a progress bar (`progress`: auto | on | off, see `entrl.progress`), or else logs one line per batch.
    """
    n = sampler.config.n
    bkey = jax.random.fold_in(key, zlib.crc32(bench.key.encode()) & 0x7FFFFFFF)
    pad_to = batch_size if len(todo) > batch_size else 0
    t0 = time.perf_counter()
    with progress_bar(len(bench.records), initial=len(bench.records) - len(todo), desc=bench.key, unit="problem",
                      setting=progress) as bar:
        for b0 in range(0, len(todo), batch_size):
            idx = todo[b0:b0 + batch_size]
            recs = [bench.records[i] for i in idx]
            digests = [problem_digest(r) for r in recs]
            g = sample_and_grade(sampler, graphdef, params, tokenizer, [prompts[i] for i in idx],
                                 [r.answer for r in recs], verifier=verifier, rng=jax.random.fold_in(bkey, idx[0]),
                                 pad_to=pad_to, buckets=buckets)
            lines = []
            for r_i, rec in enumerate(recs):
                for j in range(n):
                    s = r_i * n + j
                    lines.append(json.dumps({
                        "benchmark": bench.key, "id": rec.id, "sample": j, "reference": rec.answer,
                        "problem_digest": digests[r_i],
                        "answer": g.answers[s], "correct": bool(g.correct_PxN[r_i, j]), "status": g.status[s],
                        "finish_reason": FINISH_REASONS[int(g.finish_code[s])], "length": int(g.lengths[s]),
                        "response": g.responses[s]}, ensure_ascii=False) + "\n")
            failed = None
            if jax.process_index() == 0:  # every process holds every graded row (sample_and_grade gathers them)
                try:
                    append_text(samples_file, "".join(lines), fsync=True)
                except Exception as err:  # noqa: BLE001 - OSError, or a bucket client's own HTTP errors
                    failed = err
            # every process stops when process 0 could not write (else the others wait in the next collective)
            why = gather_json(None if failed is None else str(failed))[0] if jax.process_count() > 1 else None
            if failed is not None:
                raise failed
            if why is not None:
                raise OSError(f"process 0 could not append to {samples_file}: {why}")
            bar.update(len(idx))
            if bar.disable:  # no bar drawn: one log line per batch instead
                log.info("%s: %d/%d problems sampled (%.0f s)", bench.key, min(b0 + batch_size, len(todo)),
                         len(todo), time.perf_counter() - t0)


def run_eval(cfg, *, out_dir: str | None = None, verifier=None) -> dict:
    """`entrl eval`: sample `eval.n` responses per benchmark problem, grade, write results.{md,json} and
    samples.jsonl to `out_dir` (default `eval.out_dir`). Returns the results.json content.

    The model is `model.path` (an HF checkpoint dir, an entrl run dir's `policy/`, or a hub id), the
    tokenizer `model.tokenizer` or the model's. Prompts are problem + `data.prompt_suffix` as one user
    turn of the chat template (`data.chat_template`). `verifier` (default: an `entrl.rewards.Verifier`
    pool, closed at the end) grades. See the module docstring.
    """
    e, m = cfg.eval, cfg.model
    if not e.k:
        raise ConfigError("eval.k is empty: give the k values of pass@k / avg@k / maj@k (--k 1,8)")
    ks = sorted({int(k) for k in e.k})
    if len(ks) != len(e.k):
        raise ConfigError(f"eval.k={list(e.k)} gives a k more than once (--k): give each once")
    if not e.benchmarks:
        raise ConfigError("eval.benchmarks is empty")
    try:
        for k in ks:
            _check_k(e.n, k)
    except ValueError as err:
        raise ConfigError(f"eval.k: {err}; raise eval.n or drop that k") from None
    out_dir = out_dir or e.out_dir
    if not out_dir:
        raise ConfigError("no output directory: give --out or eval.out_dir")
    suites = [load_benchmark(b, data_dir=e.data_dir or None, max_problems=e.max_problems,
                             dir_option="eval.data_dir (--data-dir)") for b in e.benchmarks]
    if len({s.key for s in suites}) != len(suites):
        raise ConfigError(f"eval.benchmarks {list(e.benchmarks)} name the same benchmark twice")
    maybe_initialize_distributed()
    buckets = tuple(cfg.rollout.prompt_buckets)
    model_dir = resolve_model_dir(m.path)
    tok = build_tokenizer(cfg)
    tok_name = m.tokenizer or str(model_dir)
    kv_dtype = cache_dtype(cfg, e.cache_dtype)
    suffix = cfg.data.prompt_suffix
    prompts = {s.key: _prompt_tokens(s, tok, buckets, suffix=suffix, chat_template=cfg.data.chat_template)
               for s in suites}
    _check_context(model_dir, prompts, buckets, e.max_new_tokens)
    check_tokenizer_fits(cfg, tok, ModelConfig.from_pretrained(model_dir).vocab_size)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out = as_path(out_dir, "--out")  # local or gs://
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for samples.jsonl and results.json")
    if out.is_dir() and (is_run_dir(out) or is_model_dir(out)):
        raise ConfigError(f"--out {out_dir} is a{' training run' if is_run_dir(out) else ' model'} directory; give "
                          "the evaluation its own directory (e.g. <run>/eval)")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(model_dir.resolve()) if model_dir.exists() else str(model_dir), "tokenizer": tok_name,
                "n": e.n, "temperature": float(e.temperature), "top_p": float(e.top_p), "top_k": e.top_k,
                "max_new_tokens": e.max_new_tokens, "seed": e.seed, "dtype": m.dtype, "cache_dtype": kv_dtype,
                "chat_template": cfg.data.chat_template, "prompt_suffix": suffix,
                # the grades on disk are the grader's: another equivalence or time limit would mix two
                "equivalent": cfg.reward.equivalent, "timeout_s": float(cfg.reward.timeout_s)}
    samples_file = out / "samples.jsonl"
    have_samples = samples_file.exists() and samples_file.stat().length > 0
    _check_run_settings(out, settings, have_samples, write=False)  # before any weight is read
    # Loaded even when every sample is on disk: the weights behind a path change when its run trains on.
    try:
        net = load_pretrained(model_dir, dtype=m.dtype, param_dtype=m.dtype, mesh=mesh)
    except CheckpointFilesError as e:
        raise ConfigError(f"--model {m.path!r}: {e}") from None
    graphdef, params = nnx.split(net)
    settings["weights"] = weights_digest(params)
    # Settings first: reading with another n would take every problem on disk for a partial one.
    _check_run_settings(out, settings, have_samples)
    done = _read_samples(samples_file, e.n)
    _check_same_problems(suites, done, out)
    todo = {s.key: [i for i, r in enumerate(s.records) if (s.key, r.id) not in done] for s in suites}

    own_verifier = verifier is None
    if own_verifier:
        try:
            verifier = Verifier(workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s,
                                equivalent=cfg.reward.equivalent or None)
        except ValueError as err:  # reward.equivalent that does not import
            raise ConfigError(f"reward.equivalent: {err}") from None
    try:
        if any(todo.values()):
            batch = eval_batch_problems(cfg, mesh)
            sc = SamplingConfig.for_tokenizer(tok, n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                                              max_new_tokens=e.max_new_tokens, cache_dtype=kv_dtype)
            sc.check_vocab(net.cfg.vocab_size)
            log.info("eval: %d problems x %d samples per sampler call, on %d devices (%d data shards)", batch,
                     e.n, mesh.size, data_shards(mesh))
            for s in suites:
                if todo[s.key]:
                    _sample_benchmark(s, prompts[s.key], todo[s.key], sampler=Sampler(sc, mesh=mesh),
                                      graphdef=graphdef, params=params, tokenizer=tok, verifier=verifier,
                                      key=jax.random.key(e.seed), batch_size=batch, buckets=buckets,
                                      samples_file=samples_file, progress=cfg.train.progress)
            if jax.process_count() > 1:  # process 0's appends are on disk before anyone reads them
                multihost_utils.sync_global_devices("entrl_eval_samples_written")
            done = _read_samples(samples_file, e.n)

        per: dict[str, dict] = {}
        hook = getattr(verifier, "equivalent_pairs", None)
        for s in suites:
            rows = [done[(s.key, r.id)] for r in s.records]
            metrics = benchmark_metrics(rows, ks, pairs_equivalent=hook)
            metrics["flagged"] = [{"id": r.id, "answer": r.answer, "reasons": f,
                                   "accuracy": float(np.mean([x["correct"] for x in rs]))}
                                  for r, rs in zip(s.records, rows) if (f := answer_format_flags(r.answer))]
            per[s.key] = {"label": s.label, **metrics}
    finally:
        if own_verifier:
            verifier.close()
    results = {"settings": {**settings, "ks": ks, "benchmarks": [s.key for s in suites], "data_dir": e.data_dir,
                            "max_problems": e.max_problems},
               "ks": ks, "benchmarks": per, "average": average_metrics(per, ks)}
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (out / "results.md").write_text(results_markdown(results))
    return results


def eval_batch_problems(cfg, mesh) -> int:
    """Problems per sampler call: `eval.batch_problems`, or (0) the most that fit the accelerator's memory
    (`entrl.plan.auto_eval_batch`), or 64 where the devices report no memory (CPU). The call's rows
    (problems x eval.n) must split over the data shards."""
    e = cfg.eval
    shards = data_shards(mesh)
    batch = e.batch_problems
    if not batch:
        budget, _ = plan.device_budget()
        batch = plan.auto_eval_batch(cfg, budget) if budget else 64
    if batch * e.n % shards:
        raise ConfigError(f"eval.batch_problems={batch} x eval.n={e.n} rows per sampler call do not split over the "
                          f"{shards} data shards (mesh.data * mesh.fsdp)")
    return batch
