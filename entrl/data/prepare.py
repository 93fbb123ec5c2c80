"""`entrl data prepare`: a clean training set from the hub or local files.

The paper trains on DAPO-Math-17k (`BytedTsinghua-SIA/DAPO-Math-17k`), which on
the hub repeats each of its ~17.9k prompts about 100 times inside DAPO's
instruction template and carries LaTeX damaged by escape decoding. This module
turns such a source into `id, problem, answer, source, lang` rows, printing the
count after every stage:

1. Read (any format `entrl.data.sources` reads: plain columns, verl's chat
   `prompt` + `reward_model.ground_truth`, TRL's conversational `prompt`). A
   chat prompt contributes the text of its last user message.
2. Strip known instruction templates, so the training prompt is the problem
   plus entrl's own suffix (`data.prompt_suffix`) instead of two competing
   instructions: DAPO's English wrapper ("Solve the following math problem
   step by step. The last line ... Answer: $Answer ...") and its Chinese
   suffix ("让我们一步一步地思考。请以“Answer: \\boxed{...}”...").
3. Repair escape damage (`repair_latex`): a LaTeX command whose backslash
   escape was decoded as a control character is restored (form feed + `rac`
   -> `\\frac`, tab + `imes` -> `\\times`, newline + `abla` -> `\\nabla`,
   backspace + `eta` -> `\\beta`, ...). Tab and newline are repaired only
   before remainders no English word or formula line starts with (`\\neq` and
   `\\nu` look exactly like a newline before "equal"/"u", and in DAPO they are
   newlines). Every other C0/C1 control character except tab and newline is
   deleted (PDF debris such as `fi\\x0crst`).
4. Deduplicate by problem text (after 2-3, surrounding whitespace stripped):
   the first occurrence is kept; a text seen with two different answers is
   dropped altogether (no way to tell which is right).
5. Decontaminate against the evaluation benchmarks (`find_overlaps`): a
   training problem is removed when it contains most of a benchmark problem.
   Both texts are normalised (NFKC, lower case, `\\dfrac`/`\\tfrac` ->
   `\\frac`, `\\leq` -> `\\le`, spacing commands, `\\left`/`\\right`,
   `\\text`, math delimiters, braces and whitespace removed) and cut into
   20-character shingles; shingles found in more than 3 benchmark problems are
   boilerplate ("where m and n are relatively prime positive integers") and
   ignored. The score is the fraction of the benchmark problem's remaining
   shingles that occur in the training problem; it is contamination when the
   score is >= 0.5, or >= 0.3 and every number of the benchmark problem also
   appears in the training problem (a paraphrase with the same data). DAPO
   restates many benchmark problems with an appended "the answer is in the
   form m/n, give m+n", which this containment measure (not a symmetric
   similarity) is built to catch. On the repaired DAPO-Math-17k against the
   six benchmarks it removes 182 of 17,240 problems; 179 of them are among the
   208 rows a separate heuristic removed (the reference list used in the
   tests), and the 29 rows only that list removes are mostly look-alikes (same
   template, different problem), with a few heavy paraphrases that a text
   measure cannot see. The matches are written next to the output
   (`<out>.decontam.jsonl`) for inspection.
6. Write JSONL or Parquet (by suffix): `id` (`<prefix>-<source id or row
   index>`), `problem`, `answer`, `source`, `lang` (`zh` when the problem has
   CJK characters, else `en`) and the input's other columns. Optionally add
   the semantic-entropy columns with `entrl semantic-entropy`'s annotation and
   a given config (resumable; prompts the config cannot take are dropped, as
   in training).

Left out on purpose: fuzzy deduplication of training problems among
themselves (paraphrases within DAPO stay), and embedding-based
decontamination (no model in a data command; the containment test catches
restatements, not re-wordings of the whole problem).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from entrl import config as C
from entrl.config import ConfigError
from entrl.data.sources import Record, load_records, source_columns, write_records
from entrl.eval_suites import BENCHMARKS, load_benchmark
from entrl.rl.setup import annotate_dataset
from entrl.rundir import inside

BENCHMARK_NAMES = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named training source: where it lives and how its columns read."""

    hub_id: str  # dataset id on the hub
    problem_key: str  # column with the problem (text or chat messages)
    answer_key: str  # column with the reference answer (dotted for nested)
    id_key: str  # column with a row id ("" = row index)
    id_prefix: str  # output ids are <id_prefix>-<source id>
    source: str  # value of the output's `source` column


PRESETS = {
    "dapo17k": Preset("BytedTsinghua-SIA/DAPO-Math-17k", "prompt", "reward_model.ground_truth", "", "dapo17k",
                      "dapo_math_17k"),
}


# ---------------------------------------------------------------------------
# Text clean-up
# ---------------------------------------------------------------------------

# (name, pattern whose group 1 is the problem): instruction templates wrapped around the problem.
INSTRUCTION_TEMPLATES: tuple[tuple[str, re.Pattern], ...] = (
    ("dapo_en", re.compile(
        r"^\s*Solve the following math problem step by step\. The last line of your response should be of the form "
        r"Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*(.*?)\s*"
        r"Remember to put your answer on its own line after \"Answer:\"\.?\s*$", re.S)),
    ("dapo_zh", re.compile(r"^(.*?)\s*让我们一步一步地思考。请以“Answer:.*$", re.S)),
)

# Control character an escape was decoded to -> (its letter, the command remainders to restore).
_ESCAPES = {
    "\x07": ("a", ("lpha", "ngle", "pprox")),
    "\x08": ("b", ("eta", "inom", "oxed", "ar")),
    "\x0b": ("v", ("ec", "arphi", "dots")),
    "\x0c": ("f", ("rac", "orall")),
    "\r": ("r", ("ight", "ho", "angle")),
    "\t": ("t", ("ext", "riangle", "imes", "heta", "frac")),  # a real tab may precede any other word
    "\n": ("n", ("abla",)),  # `\neq`, `\nu` look like a newline before "equal"/"u"
}
_ESCAPE_RE = re.compile("(" + "|".join(re.escape(c) for c in _ESCAPES) + ")([A-Za-z]+)")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 except tab and newline


def strip_instructions(text: str) -> tuple[str, list[str]]:
    """(problem without the known instruction templates, the names of those removed). Templates are tried in
    order, each once: DAPO's Chinese problems sit inside the English wrapper with their own suffix."""
    names = []
    for name, pattern in INSTRUCTION_TEMPLATES:
        m = pattern.match(text)
        if m and m.group(1).strip():
            text = m.group(1).strip()
            names.append(name)
    return text, names


def repair_latex(text: str) -> tuple[str, collections.Counter]:
    """Restore LaTeX commands whose backslash escape became a control character; delete other control
    characters (see the module docstring). Returns the text and a count per repair (`\\frac`, ..., `deleted`)."""
    counts: collections.Counter = collections.Counter()

    def restore(m: re.Match) -> str:
        letter, rests = _ESCAPES[m.group(1)]
        word = m.group(2)
        for rest in rests:
            if word.startswith(rest):
                counts["\\" + letter + rest] += 1
                return "\\" + letter + word
        return m.group(0)

    text = _ESCAPE_RE.sub(restore, text)
    deleted = len(_CONTROL_RE.findall(text))
    if deleted:
        counts["deleted"] += deleted
        text = _CONTROL_RE.sub("", text)
    return text, counts


def language(text: str) -> str:
    """`zh` when the text has CJK ideographs, else `en`."""
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


# ---------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------

SHINGLE_CHARS = 20
BOILERPLATE_MIN_PROBLEMS = 4  # a shingle in this many benchmark problems is boilerplate
HIGH_SCORE = 0.5  # contamination on text alone
LOW_SCORE = 0.3  # contamination when every number of the benchmark problem is there too

_ALIASES = {"\\dfrac": "\\frac", "\\tfrac": "\\frac", "\\leq": "\\le", "\\geq": "\\ge", "\\leqslant": "\\le",
            "\\geqslant": "\\ge", "\\neq": "\\ne"}
_COMMAND_RE = re.compile(r"\\[a-z]+")
_DROP_RE = re.compile(r"\\(?:left|right|bigl|bigr|big|displaystyle|textbf|text|mathrm|mathbf|qquad|quad)(?![a-z])"
                      r"|\\[,;!: ()\[\]]|[\s${}\\~]")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def normalize_for_overlap(text: str) -> str:
    """The text as decontamination compares it (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _COMMAND_RE.sub(lambda m: _ALIASES.get(m.group(), m.group()), text)
    return _DROP_RE.sub("", text)


def _shingles(text: str) -> set[str]:
    s = normalize_for_overlap(text)
    return {s[i:i + SHINGLE_CHARS] for i in range(max(1, len(s) - SHINGLE_CHARS + 1))} if s else set()


@dataclasses.dataclass(frozen=True)
class Overlap:
    train_index: int  # index into the training problems
    benchmark: str  # benchmark name
    eval_id: str  # id of the benchmark problem
    score: float  # fraction of the benchmark problem's informative shingles found in the training problem
    numbers_present: bool  # every number of the benchmark problem occurs in the training problem


def find_overlaps(train_problems: Sequence[str], benchmarks: dict[str, Sequence[Record]]) -> list[Overlap]:
    """Every (training problem, benchmark problem) pair that counts as contamination, best score first per
    training problem (see the module docstring for the test)."""
    bench = [(name, rec) for name, recs in benchmarks.items() for rec in recs]
    shingles = [_shingles(rec.problem) for _, rec in bench]
    df = collections.Counter(x for s in shingles for x in s)
    informative = [{x for x in s if df[x] < BOILERPLATE_MIN_PROBLEMS} for s in shingles]
    numbers = [set(_NUMBER_RE.findall(rec.problem)) for _, rec in bench]
    index: dict[str, list[int]] = collections.defaultdict(list)
    for j, s in enumerate(informative):
        for x in s:
            index[x].append(j)
    out = []
    for i, text in enumerate(train_problems):
        hits: collections.Counter = collections.Counter()
        for x in _shingles(text):
            for j in index.get(x, ()):
                hits[j] += 1
        found = []
        for j, h in hits.items():
            score = h / len(informative[j])
            present = numbers[j] <= set(_NUMBER_RE.findall(text))
            if score >= HIGH_SCORE or (score >= LOW_SCORE and present and numbers[j]):
                found.append(Overlap(i, bench[j][0], bench[j][1].id, round(score, 3), present))
        out += sorted(found, key=lambda o: -o.score)
    return out


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def clean_problems(records: Sequence[Record], echo: Callable[[str], None] = print) -> list[tuple[Record, str]]:
    """(record, its problem without instruction templates and escape damage, stripped), with a line per stage."""
    templates: collections.Counter = collections.Counter()
    repairs: collections.Counter = collections.Counter()
    changed = stripped = 0
    cleaned = []
    for rec in records:
        text, names = strip_instructions(rec.problem)
        templates.update(names)
        stripped += bool(names)
        fixed, counts = repair_latex(text)
        changed += fixed != text
        repairs.update(counts)
        cleaned.append((rec, fixed.strip()))
    echo(f"instruction templates removed from {stripped} problems "
         f"({', '.join(f'{k} {v}' for k, v in templates.items() if v) or 'none found'})")
    echo(f"encoding repairs in {changed} problems "
         f"({', '.join(f'{k} {v}' for k, v in sorted(repairs.items())) or 'none needed'})")
    return cleaned


def deduplicate(cleaned: Sequence[tuple[Record, str]]) -> tuple[list[tuple[Record, str]], int, int]:
    """(first occurrence of every problem text whose answers agree, number of distinct texts, number dropped
    for conflicting answers)."""
    first: dict[str, tuple[Record, str]] = {}
    answers: dict[str, set[str]] = collections.defaultdict(set)
    for rec, text in cleaned:
        first.setdefault(text, (rec, text))
        answers[text].add(rec.answer.strip())
    conflicting = {t for t, a in answers.items() if len(a) > 1}
    return [v for t, v in first.items() if t not in conflicting], len(first), len(conflicting)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    rows: list[dict[str, Any]]  # the written rows
    counts: dict[str, int]  # rows after each stage: read, unique, consistent, kept
    removed: list[dict[str, Any]]  # decontaminated rows with their matches (also in <out>.decontam.jsonl)
    out: Path


def _keys(source: str, split: str, preset: Preset | None, problem_key, answer_key, id_key) -> tuple[str, str, str]:
    """Column keys: given > the preset's > read from the columns (verl layout, else problem/answer/id)."""
    if preset is not None:
        return (problem_key or preset.problem_key, answer_key or preset.answer_key,
                preset.id_key if id_key is None else id_key)
    if problem_key and answer_key and id_key is not None:
        return problem_key, answer_key, id_key
    columns = source_columns(source, split=split)
    verl = "prompt" in columns and "reward_model" in columns and "problem" not in columns
    return (problem_key or ("prompt" if verl else "problem"),
            answer_key or ("reward_model.ground_truth" if verl else "answer"),
            id_key if id_key is not None else ("id" if "id" in columns else ""))


def load_benchmarks(names: Sequence[str], bench_dir: str | None) -> dict[str, list[Record]]:
    """The benchmarks to decontaminate against: `<bench_dir>/<name>.jsonl`, else each one's hub dataset (or
    the name as a file or hub id); a ConfigError naming --bench-dir when one cannot be read."""
    return {name: list(load_benchmark(name, data_dir=bench_dir, dir_option="--bench-dir").records) for name in names}


def prepare(source: str, out: str | Path, *, split: str = "train", problem_key: str | None = None,
            answer_key: str | None = None, id_key: str | None = None, id_prefix: str | None = None,
            source_name: str | None = None, benchmarks: Sequence[str] = BENCHMARK_NAMES,
            bench_dir: str | None = None, max_rows: int = 0, on_bad_row: str = "skip",
            se_config: str | None = None, se_overrides: Sequence[str] = (),
            echo: Callable[[str], None] = print) -> PrepareResult:
    """Read `source` (a preset name, a hub id, a file or directory), clean it up, write `out` (see the module
    docstring); prints one line per stage through `echo`."""
    out = Path(out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"--out {str(out)!r}: must end in .jsonl or .parquet")
    if Path(source).exists() and inside(out, source):
        raise ConfigError(f"--out {str(out)!r} would overwrite the source {source!r}: write the prepared set elsewhere")
    preset = PRESETS.get(source) or next((p for p in PRESETS.values() if p.hub_id == source), None)
    where = preset.hub_id if preset else source
    try:
        pkey, akey, ikey = _keys(where, split, preset, problem_key, answer_key, id_key)
        echo(f"reading {where} (problem: {pkey!r}, answer: {akey!r}, id: {ikey or 'row index'!r})")
        res = load_records(where, split=split, id_key=ikey, problem_key=pkey, answer_key=akey,
                           on_bad_row=on_bad_row, max_rows=max_rows)
    except ValueError as e:
        hint = "; number the rows instead with --id-key ''" if "duplicate id" in str(e) else ""
        raise ConfigError(f"{e}{hint}") from None
    records = res.records
    echo(f"read {len(records) + res.skipped} rows; skipped {res.skipped} with a missing/empty problem or answer")
    prefix = id_prefix or (preset.id_prefix if preset else Path(where).stem.replace("/", "_").lower())
    consumed = {k.split(".", 1)[0] for k in (pkey, akey, ikey) if k}

    cleaned = clean_problems(records, echo)
    unique, distinct, conflicting = deduplicate(cleaned)
    echo(f"deduplicated: {len(cleaned)} rows -> {distinct} distinct problems; dropped {conflicting} with "
         f"conflicting answers -> {len(unique)}")

    matched: dict[int, list[Overlap]] = collections.defaultdict(list)
    if benchmarks:
        bench = load_benchmarks(list(benchmarks), bench_dir)
        for o in find_overlaps([text for _, text in unique], bench):
            matched[o.train_index].append(o)
        per_bench = collections.Counter(os_[0].benchmark for os_ in matched.values())
        sizes = ", ".join(f"{k} {len(v)}" for k, v in bench.items())
        echo(f"decontaminated against {sizes} problems: removed {len(matched)} "
             f"({', '.join(f'{k} {v}' for k, v in per_bench.items()) or 'no overlap'}) -> {len(unique) - len(matched)}")
    else:
        echo("decontamination skipped (no benchmarks given)")

    def row(rec: Record, text: str) -> dict[str, Any]:
        extra = {k: v for k, v in rec.extra.items() if k not in consumed}
        own = [extra.pop(k, None) for k in ("source", "data_source")]  # the input's own source column, if any
        src = source_name or (preset.source if preset else None) or own[0] or own[1] or prefix
        return {"id": f"{prefix}-{rec.id}", "problem": text, "answer": rec.answer.strip(), "source": src,
                "lang": language(text), **{k: v for k, v in extra.items() if k not in ("id", "problem", "answer")}}

    rows = [row(*v) for i, v in enumerate(unique) if i not in matched]
    removed = [{**row(*unique[i]), "matched_eval": [
        {"benchmark": o.benchmark, "eval_id": o.eval_id, "score": o.score, "numbers_present": o.numbers_present}
        for o in os_]} for i, os_ in sorted(matched.items())]
    write_records(out, rows)
    if benchmarks:
        write_records(out.with_name(out.name + ".decontam.jsonl"), removed)
    langs = collections.Counter(r["lang"] for r in rows)
    echo(f"wrote {len(rows)} problems to {out} ({', '.join(f'{k} {v}' for k, v in sorted(langs.items()))})")
    counts = {"read": len(records) + res.skipped, "unique": distinct, "consistent": len(unique), "kept": len(rows)}

    if se_config:
        cfg = C.load_config(se_config, list(se_overrides))
        cfg = C.replace(cfg, **{"data.task": "math", "data.id_key": "id", "data.problem_key": "problem",
                                "data.answer_key": "answer", "data.max_rows": 0})
        echo(f"annotating semantic entropy with {se_config} (progress in {out.name}.progress.jsonl; resumable)")
        annotate_dataset(cfg, data=str(out), out=str(out))
        rows = [r.to_row() for r in load_records(out).records]
    return PrepareResult(rows, counts, removed, out)


def prepare_benchmarks(out_dir: str | Path, names: Sequence[str] = BENCHMARK_NAMES, *,
                       echo: Callable[[str], None] = print) -> list[Path]:
    """`entrl data prepare-benchmarks`: each named benchmark from the hub as `<out_dir>/<name>.jsonl`
    (`id, problem, answer, source`), the layout `entrl eval --data-dir` and `eval.data_dir` read."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    paths = []
    for name in names:
        bench = load_benchmark(name, dir_option="")  # the hub only: this command has no directory to read
        path = write_records(Path(out_dir) / f"{name}.jsonl",
                             [{"id": r.id, "problem": r.problem, "answer": r.answer, "source": name}
                              for r in bench.records])
        echo(f"{name}: {len(bench.records)} problems from {BENCHMARKS[name].hub_id} -> {path}")
        paths.append(path)
    return paths

