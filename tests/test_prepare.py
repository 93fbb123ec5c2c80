"""`entrl data prepare` / `prepare-benchmarks`: templates, encoding repairs, dedup, decontamination, SE column.

Offline on small files the tests write (verl-style Parquet, JSONL, a benchmark directory), the hub path through a
patched `datasets.load_dataset`, and the decontamination compared with the reference removal list of the shared
DAPO-Math-17k copy when it is there.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entrl.cli import main
from entrl.data.prepare import find_overlaps, prepare, repair_latex, strip_instructions
from entrl.data.sources import Record, load_records

DAPO_EN = ("Solve the following math problem step by step. The last line of your response should be of the form "
           "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
           "Remember to put your answer on its own line after \"Answer:\".")
DAPO_ZH = "\n让我们一步一步地思考。请以“Answer: \\boxed{<final_answer>}”的格式输出最终答案。请只输出最终答案的数值。"

# The benchmark problem the training set restates (an AMC-style problem with an "m+n" answer appended).
BENCH = ("The weight of $\\frac{1}{3}$ of a large pizza together with $3 \\frac{1}{2}$ cups of orange slices is the "
         "same as the weight of $\\frac{3}{4}$ of a large pizza together with $\\frac{1}{2}$ cup of orange slices. "
         "A cup of orange slices weighs $\\frac{1}{4}$ of a pound. What is the weight, in pounds, of a large pizza?")
RESTATED = (BENCH.replace("$", "\\( ", 1).replace("$", " \\)", 1) +
            " The answer can be written in the form \\frac{m}{n}, where m and n are coprime. What is m+n?")


def _verl(problem: str, answer: str, index: int, template: str = DAPO_EN) -> dict:
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": template.format(problem)}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{index}"}}


def _train_rows() -> list[dict]:
    rows = []
    for copy in range(3):  # every problem three times, as the hub copy repeats them
        rows += [
            _verl("Find $x$ if $x+1=3$.", "2", 10 * copy),
            _verl("Compute \x0crac{6}{3}\x0c.", "2", 10 * copy + 1),  # form feed + rac = damaged \frac; PDF debris
            _verl("What is $2\times 3$?", "6", 10 * copy + 2),  # tab + imes = damaged \times
            _verl(RESTATED, "9", 10 * copy + 3),
            _verl("设 $x=1$，求 $x+1$。" + DAPO_ZH, "2", 10 * copy + 4),  # as on the hub: inside the English one
        ]
    rows += [_verl("How many primes are below 10?", "4", 97), _verl("How many primes are below 10?", "5", 98)]
    return rows


@pytest.fixture()
def bench_dir(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "amc23.jsonl").write_text(json.dumps({"id": "amc-1", "problem": BENCH, "answer": "9/5"}) + "\n")
    (d / "math500.jsonl").write_text(json.dumps({"id": "m-1", "problem": "What is $1+1$?", "answer": "2"}) + "\n")
    return d


def test_repairs_and_templates():
    assert repair_latex("\x0crac{1}{2} and \tfrac, \times, \theta, \nabla f, \x08eta") == (
        "\\frac{1}{2} and \\tfrac, \\times, \\theta, \\nabla f, \\beta",
        {"\\frac": 1, "\\tfrac": 1, "\\times": 1, "\\theta": 1, "\\nabla": 1, "\\beta": 1})
    # A real newline or tab stays (\neq / \nu look like a newline before "equal"/"u"); debris is deleted.
    assert repair_latex("a\nequal b\n\tu and fi\x0crst\x14") == ("a\nequal b\n\tu and first", {"deleted": 2})
    assert strip_instructions(DAPO_EN.format("Find 1+1.")) == ("Find 1+1.", ["dapo_en"])
    assert strip_instructions("求 1+1。" + DAPO_ZH) == ("求 1+1。", ["dapo_zh"])
    assert strip_instructions(DAPO_EN.format("求 1+1。" + DAPO_ZH)) == ("求 1+1。", ["dapo_en", "dapo_zh"])
    assert strip_instructions("Find 1+1.") == ("Find 1+1.", [])


def test_prepare_verl_parquet_offline(tmp_path, bench_dir, capsys):
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(_train_rows()), src)
    out = tmp_path / "train.jsonl"
    assert main(["data", "prepare", str(src), "--out", str(out), "--bench-dir", str(bench_dir),
                 "--benchmarks", "amc23,math500", "--id-prefix", "t"]) == 0
    log = capsys.readouterr().out
    assert "problem: 'prompt', answer: 'reward_model.ground_truth', id: 'row index'" in log
    assert "read 17 rows" in log and "instruction templates removed from 17 problems (dapo_en 17, dapo_zh 3)" in log
    assert "encoding repairs in 6 problems (\\frac 3, \\times 3, deleted 3)" in log
    assert "17 rows -> 6 distinct problems; dropped 1 with conflicting answers -> 5" in log
    assert "removed 1 (amc23 1) -> 4" in log and "wrote 4 problems" in log
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["problem"], r["answer"], r["lang"]) for r in rows] == [
        ("t-0", "Find $x$ if $x+1=3$.", "2", "en"),
        ("t-1", "Compute \\frac{6}{3}.", "2", "en"),
        ("t-2", "What is $2\\times 3$?", "6", "en"),
        ("t-4", "设 $x=1$，求 $x+1$。", "2", "zh"),
    ]
    # The columns the keys read are gone (prompt, reward_model); the others stay; source = the data_source column.
    assert set(rows[0]) == {"id", "problem", "answer", "source", "lang", "ability", "extra_info"}
    assert rows[0]["source"] == "math_dapo" and rows[0]["extra_info"] == {"index": "uuid-0"}
    (removed,) = [json.loads(line) for line in (tmp_path / "train.jsonl.decontam.jsonl").read_text().splitlines()]
    assert removed["id"] == "t-3" and removed["matched_eval"][0]["eval_id"] == "amc-1"
    assert removed["matched_eval"][0]["score"] >= 0.5
    # The output is a plain entrl dataset: default keys read it.
    assert [r.id for r in load_records(out).records] == ["t-0", "t-1", "t-2", "t-4"]


def test_prepare_hub_preset_and_parquet_out(tmp_path, bench_dir, monkeypatch):
    """`dapo17k` = the hub id with verl keys (hub patched: no network in tests); Parquet output."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(_train_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = prepare("dapo17k", tmp_path / "d.parquet", bench_dir=str(bench_dir), benchmarks=["amc23"], echo=lambda s: None)
    assert calls[0] == ("BytedTsinghua-SIA/DAPO-Math-17k", "train")
    assert res.counts == {"read": 17, "unique": 6, "consistent": 5, "kept": 4}
    recs = load_records(tmp_path / "d.parquet").records
    assert [r.id for r in recs] == ["dapo17k-0", "dapo17k-1", "dapo17k-2", "dapo17k-4"]
    assert {r.extra["source"] for r in recs} == {"dapo_math_17k"}
    res = prepare("dapo17k", tmp_path / "n.jsonl", benchmarks=[], echo=lambda s: None)  # no decontamination
    assert res.counts["kept"] == 5 and not (tmp_path / "n.jsonl.decontam.jsonl").exists()


def test_prepare_plain_jsonl_and_errors(tmp_path, bench_dir, capsys):
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": a}) + "\n"
                           for i, (p, a) in enumerate([("1+1?", 2), ("1+1?", 2.0), ("2+2?", 4)])))
    res = prepare(str(src), tmp_path / "o.jsonl", benchmarks=["math500"], bench_dir=str(bench_dir),
                  echo=lambda s: None)
    assert [(r["id"], r["answer"], r["source"]) for r in res.rows] == [("plain-p0", "2", "plain"), ("plain-p2", "4", "plain")]
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o.csv")]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o.jsonl"), "--answer-key", "solution"]) == 2
    assert "column 'solution' (answer_key) not found" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o.jsonl"), "--bench-dir", str(tmp_path)]) == 2
    assert "aime24.jsonl not found" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o.jsonl"), "loss.name=grpo"]) == 2
    assert "without --se-config" in capsys.readouterr().err


def test_prepare_with_semantic_entropy_column(tmp_path):
    """--se-config annotates the prepared file with the SE columns (tiny demo model, character tokenizer)."""
    from entrl.semantic_entropy import SE_COLUMNS

    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+{i % 3}", "answer": str(i + i % 3)}) + "\n"
                           for i in range(6)))
    cfg = tmp_path / "se.yaml"
    cfg.write_text("model: {path: demo, tokenizer: char, demo_layers: 1, demo_hidden: 32, demo_heads: 2}\n"
                   "data: {prompt_suffix: '', max_prompt_len: 8}\n"
                   "rollout: {prompt_buckets: [8], max_new_tokens: 6}\n"
                   "reward: {workers: 1}\n"
                   "train: {prompts_per_step: 8, minibatch_prompts: 8, microbatch_per_shard: 0}\n")
    out = tmp_path / "se.jsonl"
    assert main(["data", "prepare", str(src), "--out", str(out), "--benchmarks", "", "--se-config", str(cfg),
                 "curriculum.samples=4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(set(SE_COLUMNS) <= set(r) and sum(r["class_sizes"]) == 4 for r in rows)
    assert rows[0]["id"] == "a-0" and rows[0]["lang"] == "en"


def test_prepare_benchmarks_from_hub(tmp_path, monkeypatch):
    import datasets

    from entrl.eval_suites import load_benchmark

    tables = {"HuggingFaceH4/aime_2024": [{"id": 60, "problem": "Find x.", "answer": "025"}],
              "math-ai/amc23": [{"id": 1, "question": "Find y.", "answer": 27.0}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(tables[name]))
    assert main(["data", "prepare-benchmarks", "--out", str(tmp_path / "b"), "--benchmarks", "aime24,amc23"]) == 0
    amc = load_benchmark("amc23", data_dir=str(tmp_path / "b")).records
    assert [(r.id, r.problem, r.answer, r.extra["source"]) for r in amc] == [("1", "Find y.", "27", "amc23")]
    assert load_benchmark("aime24", data_dir=str(tmp_path / "b")).records[0].problem == "Find x."
    assert main(["data", "prepare-benchmarks", "--out", str(tmp_path / "b"), "--benchmarks", "gsm8k"]) == 2



def test_bench_dir_names_and_hints(tmp_path, bench_dir, capsys, monkeypatch):
    """--bench-dir reads `<dir>/<name>.jsonl` for any name, not only the built-in ones; a missing --bench-dir and
    a hub failure are one line naming this command's flag (--bench-dir; none for prepare-benchmarks)."""
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (bench_dir / "mini.jsonl").write_text(json.dumps({"id": "mini-1", "problem": BENCH, "answer": "9/5"}) + "\n")
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "9"}) + "\n"
                           for i, p in enumerate([RESTATED, "What is 4+5?"])))
    res = prepare(str(src), tmp_path / "o.jsonl", benchmarks=["mini"], bench_dir=str(bench_dir), echo=lambda s: None)
    assert [r["id"] for r in res.rows] == ["plain-p1"]
    assert res.removed[0]["matched_eval"][0]["benchmark"] == "mini"

    def one_line_error(argv) -> str:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("entrl: config error:")
        return err

    prep = ["data", "prepare", str(src), "--out", str(tmp_path / "p.jsonl")]
    err = one_line_error([*prep, "--benchmarks", "mini", "--bench-dir", str(tmp_path / "nodir")])
    assert "--bench-dir is" in err and "no such directory" in err
    err = one_line_error([*prep, "--benchmarks", "aime24"])
    assert "from the hub" in err and "give --bench-dir a directory" in err and "--data-dir" not in err
    err = one_line_error(["data", "prepare-benchmarks", "--out", str(tmp_path / "b"), "--benchmarks", "aime24"])
    assert "from the hub" in err and "--data-dir" not in err and "--bench-dir" not in err


def test_overlap_needs_the_numbers_and_ignores_boilerplate():
    q2 = "Let $x$ and $y$ be positive reals with $x+y=10$. Find the maximum of $xy$."
    bench = {"b": [Record("q1", BENCH, "9/5"), Record("q2", q2, "25")]}
    train = [RESTATED,
             "Let $x$ and $y$ be positive reals with $x+y=7$. Find the maximum of $x^2y$.",  # same template
             "Let $x$ and $y$ be positive reals with $x+y=10$; what is the largest value $xy$ can take?",  # same data
             "How many primes are below 100?"]
    found = find_overlaps(train, bench)
    assert [(o.train_index, o.eval_id) for o in found] == [(0, "q1"), (2, "q2")]
    assert found[0].score >= 0.5 and 0.3 <= found[1].score < 0.5 and found[1].numbers_present
    # A phrase in 4 or more benchmark problems is boilerplate: sharing only it is no overlap.
    tail = " The answer can be written as $\\frac{m}{n}$ where $m$ and $n$ are relatively prime. Find $m+n$."
    bench = {"b": [Record(f"q{i}", f"Problem {i}: a bag holds {i} red balls." + tail, "1") for i in range(4)]}
    assert find_overlaps(["A die is rolled twice." + tail], bench) == []
    assert [o.eval_id for o in find_overlaps(["Problem 2: a bag holds 2 red balls." + tail], bench)] == ["q2"]


def test_decontamination_agrees_with_the_reference_list(shared_data):
    """The shared DAPO-Math-17k copy: its 17,032 kept + 208 removed problems against the six benchmarks."""
    from entrl.data.prepare import BENCHMARK_NAMES, load_benchmarks

    kept = load_records(shared_data / "train_dapo17k.jsonl").records
    removed = load_records(shared_data / "decontam_dapo17k_removed.jsonl").records
    texts = [r.problem for r in kept + removed]
    ids = [r.id for r in kept + removed]
    mine = {ids[o.train_index] for o in find_overlaps(texts, load_benchmarks(BENCHMARK_NAMES, str(shared_data)))}
    ref = {r.id for r in removed}
    assert len(mine & ref) >= 175 and len(mine - ref) <= 5, (len(mine), len(mine & ref), sorted(mine - ref))
