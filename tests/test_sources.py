"""entrl.data.sources: real shared files, Parquet, bad rows, missing columns, round trips."""

import json
import logging

import numpy as np
import pytest

from entrl.data.sources import Record, load_records, write_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math500_keeps_level_extra(shared_data):
    res = load_records(shared_data / "math500.jsonl")
    assert len(res.records) == 500 and res.skipped == 0
    r = res.records[0]
    assert r.id == "test/precalculus/807.json"
    assert r.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert r.extra["level"] == 2 and r.extra["subject"] == "Precalculus" and r.extra["source"] == "math500"
    assert "id" not in r.extra and "problem" not in r.extra


def test_dapo_first_rows(shared_data):
    res = load_records(shared_data / "train_dapo17k.jsonl", max_rows=50)
    assert len(res.records) == 50
    assert res.records[0].id == "dapo17k-0"
    assert all(r.problem and r.answer for r in res.records)
    assert {r.extra["lang"] for r in res.records} <= {"en", "zh"}


def test_parquet_numeric_answers_and_round_trip(tmp_path):
    rows = [
        {"id": "a", "problem": "1+1?", "answer": "2", "se": np.float32(0.5), "pass_rate": 0.25},
        {"id": "b", "problem": "half?", "answer": "\\frac{1}{2}", "se": 0.0, "pass_rate": 1.0},
    ]
    path = write_records(tmp_path / "d.parquet", rows)
    res = load_records(path)
    assert [r.answer for r in res.records] == ["2", "\\frac{1}{2}"]
    assert res.records[0].extra == {"se": 0.5, "pass_rate": 0.25}
    # Record -> row -> JSONL -> Record is the identity.
    out = write_records(tmp_path / "d.jsonl", [r.to_row() for r in res.records])
    assert load_records(out).records == res.records


def test_float_answers_become_strings(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [
        {"id": "1", "problem": "p", "answer": 27.0},
        {"id": "2", "problem": "p", "answer": 2.5},
        {"id": "3", "problem": "p", "answer": -4},
    ])
    assert [r.answer for r in load_records(p).records] == ["27", "2.5", "-4"]


def test_custom_columns_and_row_index_ids(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q0", "final": "0"}, {"question": "q1", "final": "1"}])
    res = load_records(p, id_key="", problem_key="question", answer_key="final")
    assert [(r.id, r.problem, r.answer) for r in res.records] == [("0", "q0", "0"), ("1", "q1", "1")]


def test_missing_answer_column_names_it(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "problem": "p", "solution": "s"}])
    with pytest.raises(ValueError, match=r"column 'answer'.*available columns: \['id', 'problem', 'solution'\]"):
        load_records(p)
    q = write_records(tmp_path / "x.parquet", [{"id": "1", "problem": "p"}])
    with pytest.raises(ValueError, match="column 'answer'"):
        load_records(q)
    with pytest.raises(ValueError, match="column 'uid'.*id_key"):
        load_records(p, id_key="uid")


def test_bad_rows_error_or_skip(tmp_path, caplog):
    rows = [
        {"id": "ok1", "problem": "p", "answer": "1"},
        {"id": "empty", "problem": "p", "answer": "  "},
        {"id": "noanswer", "problem": "p"},
        {"id": "noproblem", "problem": "", "answer": "3"},
        {"id": "list", "problem": "p", "answer": ["1", "2"]},
        {"id": "ok2", "problem": "p", "answer": "2"},
    ]
    p = _write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(ValueError, match=r"row id='empty' \(x.jsonl line 2\): answer column 'answer' is empty"):
        load_records(p)
    with caplog.at_level(logging.WARNING):
        res = load_records(p, on_bad_row="skip")
    assert [r.id for r in res.records] == ["ok1", "ok2"]
    assert res.skipped == 4 and res.skipped_ids == ["empty", "noanswer", "noproblem", "list"]
    assert "skipped 4 bad row(s)" in caplog.text


def test_duplicate_ids_and_bad_json(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "problem": "p", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_records(p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_records(bad)


def test_directory_json_array_and_missing_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", [{"id": "a", "problem": "p", "answer": "1"}])
    (d / "b.json").write_text(json.dumps([{"id": "b", "problem": "q", "answer": "2"}]))
    (d / "notes.txt").write_text("ignored")
    assert [r.id for r in load_records(d).records] == ["a", "b"]
    assert [r.id for r in load_records(d, max_rows=1).records] == ["a"]
    with pytest.raises(ValueError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_write_records_rejects_unknown_suffix_and_mixed_columns(tmp_path):
    with pytest.raises(ValueError, match=".csv"):
        write_records(tmp_path / "x.csv", [Record("a", "p", "1").to_row()])
    with pytest.raises(ValueError, match="column 'answer' mixes value types"):
        write_records(tmp_path / "x.parquet", [{"answer": 2}, {"answer": "x"}])
    assert not list(tmp_path.glob(".x.parquet.tmp*"))


def test_hub_path_through_datasets(monkeypatch):
    """Hub ids go through datasets.load_dataset (patched here: tests never touch the network)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([
            {"question": "1+1?", "final": 2, "level": 1},
            {"question": "", "final": 3, "level": 2},
            {"question": "2+2?", "final": 4, "level": 3},
        ])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = load_records("org/set", id_key="", problem_key="question", answer_key="final", on_bad_row="skip")
    assert calls == [("org/set", "train")]
    assert [(r.id, r.answer, r.extra) for r in res.records] == [("0", "2", {"level": 1}), ("2", "4", {"level": 3})]
    assert res.skipped_ids == ["1"]
    with pytest.raises(ValueError, match=r"row id='1' \(hub:org/set\[train\] index 1\)"):
        load_records("org/set", id_key="", problem_key="question", answer_key="final")
    with pytest.raises(ValueError, match="column 'answer'.*available columns"):
        load_records("org/set", id_key="", problem_key="question")
    load_records("org/set", split="test", id_key="", problem_key="question", answer_key="final", max_rows=1)
    assert calls[-1] == ("org/set", "test[:1]")


# -- verl / TRL formats, dotted keys, exact float answers ----------------------

VERL_KEYS = dict(id_key="extra_info.index", problem_key="prompt", answer_key="reward_model.ground_truth")


def _verl_rows():
    return [
        {"data_source": "math_dapo", "ability": "MATH",
         "prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}],
         "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": 7, "split": "train"}},
        {"data_source": "math_dapo", "ability": "MATH", "prompt": [{"role": "user", "content": "2+2?"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": {"index": 9, "split": "train"}},
    ]


def test_verl_parquet_by_dotted_keys(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows()), path)
    res = load_records(path, **VERL_KEYS)
    a, b = res.records
    assert (a.id, a.problem, a.answer) == ("7", "1+1?", "2") and (b.id, b.problem, b.answer) == ("9", "2+2?", "4")
    assert a.messages == ({"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"})
    assert a.prompt == [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}]
    # The consumed flat column is gone; the nested ones stay (they hold more than the key read).
    assert set(a.extra) == {"data_source", "ability", "reward_model", "extra_info"}
    assert a.extra["reward_model"]["style"] == "rule"
    # Written back with the same keys, the file has the verl layout and reads back to the same records.
    rows = [r.to_row(**VERL_KEYS) for r in res.records]
    assert rows[0]["prompt"] == _verl_rows()[0]["prompt"] and rows[0]["reward_model"]["ground_truth"] == "2"
    assert rows[0]["extra_info"] == {"index": 7, "split": "train"} and "problem" not in rows[0]
    again = load_records(write_records(tmp_path / "back.parquet", rows), **VERL_KEYS).records
    assert again == res.records
    # The default keys write the flat entrl layout: problem = the messages, answer and id flat.
    flat = a.to_row()
    assert flat["id"] == "7" and flat["problem"] == a.prompt and flat["answer"] == "2"
    assert load_records(write_records(tmp_path / "flat.jsonl", [r.to_row() for r in res.records])).records \
        == res.records


def test_trl_conversational_jsonl(tmp_path):
    p = _write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": [{"role": "user", "content": "What is 3*3?"}], "solution": 9.0},
        {"prompt": [{"role": "user", "content": "What is 1e23?"}], "solution": 1e23},
    ])
    res = load_records(p, id_key="", problem_key="prompt", answer_key="solution")
    assert [(r.id, r.problem, r.answer) for r in res.records] == [
        ("0", "What is 3*3?", "9"), ("1", "What is 1e23?", "100000000000000000000000")]
    assert res.records[0].messages == ({"role": "user", "content": "What is 3*3?"},)


def test_format_errors_name_the_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows()), path)
    with pytest.raises(ValueError, match=r"column 'id'.*looks like a verl dataset: set data.problem_key=prompt "
                                         r"data.answer_key=reward_model.ground_truth"):
        load_records(path)
    with pytest.raises(ValueError, match=r"'reward_model.truth' \(answer_key\) not found in the first row; "
                                         r"'reward_model' has keys \['ground_truth', 'style'\]"):
        load_records(path, **{**VERL_KEYS, "answer_key": "reward_model.truth"})
    with pytest.raises(ValueError, match=r"column 'answers.x' \(answer_key\) not found"):
        load_records(path, **{**VERL_KEYS, "answer_key": "answers.x"})
    bad = _write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "sft", "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "answer": "1"},
        {"id": "parts", "prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "answer": "1"},
        {"id": "none", "prompt": [], "answer": "1"},
        {"id": "dict", "prompt": {"role": "user"}, "answer": "1"},
        {"id": "inf", "prompt": "q", "answer": float("inf")},
        {"id": "ok", "prompt": [{"role": "user", "content": "q"}], "answer": 1},
    ])
    with pytest.raises(ValueError, match=r"row id='sft'.*last message is from 'assistant'.*SFT data"):
        load_records(bad, problem_key="prompt")
    res = load_records(bad, problem_key="prompt", on_bad_row="skip")
    assert [r.id for r in res.records] == ["ok"] and res.skipped_ids == ["sft", "parts", "none", "dict", "inf"]


def test_float_answers_are_exact(tmp_path):
    """Integral floats are not converted through binary: 1e23 is 1 followed by 23 zeros (issue 15)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from entrl.data.sources import number_text
    from entrl.eval_suites import _answer_text

    values = [1e23, 27.0, 2.5, 1e-7, -0.0, 0.1, 123456789012345678.0, np.float32(0.1), np.int64(-4)]
    want = ["100000000000000000000000", "27", "2.5", "0.0000001", "0", "0.1", "123456789012345680", "0.1", "-4"]
    assert [number_text(v) for v in values] == want
    assert int(1e23) == 99999999999999991611392  # what a trip through binary gives
    p = _write_jsonl(tmp_path / "x.jsonl", [{"id": str(i), "problem": "p", "answer": float(v)}
                                            for i, v in enumerate(values[:7])])
    assert [r.answer for r in load_records(p).records] == want[:7]
    q = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["p", "q"], "answer": pa.array([1e23, 0.5], pa.float64())}), q)
    assert [r.answer for r in load_records(q).records] == ["100000000000000000000000", "0.5"]
    assert _answer_text(1e23) == "100000000000000000000000" and _answer_text([27.0, 1e-7]) == "27, 0.0000001"
    assert _answer_text("$5$.") == "5"
