"""`entrl eval` end to end on a tiny random model: outputs agree with samples.jsonl, resume, errors, flags.

One tiny qwen2 model (hidden 32, 1 layer) with a byte-level HF tokenizer (every benchmark character
encodes) is saved once per module. Grading in the end-to-end runs is a deterministic stub keyed on the
response text, so that pass@k / maj@k are not all zero on random text; the CLI smoke run uses the real
`entrl.rewards.Verifier`.
"""

import json
import re
import zlib
from collections import Counter

import numpy as np
import pytest

from entrl import config as C
from entrl import eval_suites as E
from entrl import evaluation
from entrl.cli import main
from entrl.config import ConfigError
from entrl.evaluation import pass_at_k
from entrl.rewards import RewardResult

N, KS, NEW_TOKENS, BUCKETS = 4, (1, 2, 4), 4, (1024,)
# math500 row 0 is a tuple answer, minerva has decimals and `4.5e33`: both exercise the flags.
BENCHES = ["math500", "minerva"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from entrl.models import ModelConfig, create_model, save_pretrained

    d = tmp_path_factory.mktemp("model")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf.save_pretrained(str(d))
    cfg = ModelConfig(arch="qwen2", vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True, qkv_bias=True,
                      max_position_embeddings=2048, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    save_pretrained(create_model(cfg, seed=0), d)
    return d


class StubVerifier:
    """Deterministic grades from the response text: answer = crc32 % 3, correct iff the answer is "0"."""

    def score(self, responses, references):
        answers = [str(zlib.crc32(r.encode()) % 3) for r in responses]
        correct = np.array([a == "0" for a in answers])
        status = ["correct" if c else "incorrect" for c in correct]
        return RewardResult(correct.astype(np.float32), correct, answers, status, {})


_KEYS = {"benchmarks": "eval.benchmarks", "n": "eval.n", "ks": "eval.k", "data_dir": "eval.data_dir",
         "max_new_tokens": "eval.max_new_tokens", "max_problems": "eval.max_problems",
         "batch_size": "eval.batch_problems", "seed": "eval.seed", "temperature": "eval.temperature",
         "top_k": "eval.top_k", "timeout_s": "reward.timeout_s",
         "buckets": "rollout.prompt_buckets", "dtype": "model.dtype", "mesh_data": "mesh.data",
         "mesh_fsdp": "mesh.fsdp"}


def _run(model_dir, out, **kw):
    """`run_eval` with this module's settings (the config `entrl eval` would build), `kw` overriding them."""
    args = {**dict(benchmarks=BENCHES, n=N, ks=KS, max_new_tokens=NEW_TOKENS, max_problems=3, batch_size=2,
                    seed=0, buckets=BUCKETS, dtype="bfloat16"), **kw}
    overrides = [f"model.path={model_dir}", "mesh.data=-1"]
    overrides += [f"{_KEYS[k]}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in args.items()]
    return E.run_eval(C.load_config(None, overrides), out_dir=str(out), verifier=StubVerifier())


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(model_dir, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    res = _run(model_dir, out, data_dir=str(shared_data))
    return out, res, (out / "samples.jsonl").read_text()


def test_outputs_consistent_with_samples(first_run):
    out, res, _ = first_run
    rows = _rows(out / "samples.jsonl")
    assert len(rows) == len(BENCHES) * 3 * N
    assert set(rows[0]) >= {"benchmark", "id", "sample", "response", "answer", "correct", "finish_reason", "length"}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["ks"] == list(KS) and set(on_disk["benchmarks"]) == set(BENCHES)
    table = (out / "results.md").read_text()
    per_bench = {}
    for b in BENCHES:
        mine = [r for r in rows if r["benchmark"] == b]
        ids = list(dict.fromkeys(r["id"] for r in mine))
        assert len(ids) == 3
        corr = np.array([[next(r["correct"] for r in mine if r["id"] == i and r["sample"] == j) for j in range(N)]
                         for i in ids])
        m = on_disk["benchmarks"][b]
        assert m["problems"] == 3 and m["n"] == N
        for k in KS:
            assert m[f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(N, int(c), k) for c in corr.sum(1)]))
            assert m[f"avg@{k}"] == pytest.approx(corr[:, :k].mean())
            # stub answers are "0"/"1"/"2": the majority of the first k (ties: the first to appear) is right iff "0"
            answers = [[next(r["answer"] for r in mine if r["id"] == i and r["sample"] == j) for j in range(k)]
                       for i in ids]
            assert m[f"maj@{k}"] == pytest.approx(np.mean([Counter(a).most_common(1)[0][0] == "0" for a in answers]))
        assert m["maj@1"] == pytest.approx(m["avg@1"])
        assert m["response_length"] == pytest.approx(np.mean([r["length"] for r in mine]))
        assert m["truncation_rate"] == pytest.approx(np.mean([r["finish_reason"] == "length" for r in mine]))
        assert all(1 <= r["length"] <= NEW_TOKENS for r in mine)
        per_bench[b] = m
        row = f"| {m['label']} | avg@k | " + " | ".join(f"{100 * m[f'avg@{k}']:.2f}" for k in KS) + " |"
        assert row in table
    for key in ("pass@4", "avg@2", "maj@1", "truncation_rate"):
        assert on_disk["average"][key] == pytest.approx(np.mean([m[key] for m in per_bench.values()]))
    assert "**Average**" in table
    assert 0 < np.mean([r["correct"] for r in rows]) < 1  # the check above is not vacuous
    assert on_disk == json.loads(json.dumps(res))


def test_hard_answers_flagged_in_results(first_run):
    out, _, _ = first_run
    res = json.loads((out / "results.json").read_text())
    math_flags = {f["id"]: f["reasons"] for f in res["benchmarks"]["math500"]["flagged"]}
    assert math_flags["test/precalculus/807.json"] == ["tuple_or_interval"]  # \left( 3, \frac{\pi}{2} \right)
    minerva = {f["id"]: f["reasons"] for f in res["benchmarks"]["minerva"]["flagged"]}
    assert minerva == {"minerva-0": ["decimal"], "minerva-1": ["e_notation"], "minerva-2": ["decimal"]}
    assert all(0 <= f["accuracy"] <= 1 for f in res["benchmarks"]["minerva"]["flagged"])


def test_answer_format_flags(shared_data):
    answers = {}
    for name in ("minerva", "olympiadbench"):
        for line in (shared_data / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            answers[r["id"]] = r["answer"]
    # the six answers math-verify reads only as plain strings (found grading the real benchmark files)
    for rid in ("minerva-5", "minerva-27", "minerva-268", "minerva-269", "olympiadbench-1782", "olympiadbench-2045"):
        assert E.answer_format_flags(answers[rid]) == ["plain_string"], rid
    assert E.answer_format_flags("204") == []
    assert E.answer_format_flags(r"\frac{1}{2 n+2}") == []
    assert E.answer_format_flags("f(x)=x, f(x)=-x") == ["multiple_answers", "equation"]
    assert E.answer_format_flags("(1,2), (3,4)") == ["multiple_answers", "tuple_or_interval"]
    assert E.answer_format_flags("(0,4]") == ["tuple_or_interval"]
    assert E.answer_format_flags(r"x \le 3") == ["inequality"]
    assert E.answer_format_flags("MR=SRMC") == ["equation"]
    assert E.answer_format_flags(r"5\text{ cm}") == ["text"]
    assert E.answer_format_flags("{" * 12 + "1" + "}" * 12) == ["pathological"]


def test_resume_samples_only_missing_problems(first_run, model_dir, shared_data, tmp_path, monkeypatch):
    out0, res0, text0 = first_run
    rows = _rows(out0 / "samples.jsonl")
    # drop minerva's first problem entirely and one sample of its second; then a torn, half-written line
    first = next(r["id"] for r in rows if r["benchmark"] == "minerva")
    second = next(r["id"] for r in rows if r["benchmark"] == "minerva" and r["id"] != first)
    kept = [r for r in rows if r["id"] != first and not (r["id"] == second and r["sample"] == 1)]
    out = tmp_path / "eval"
    out.mkdir()
    (out / "run.json").write_text((out0 / "run.json").read_text())
    (out / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
                                       + '{"benchmark": "minerva", "id": "mi')
    calls = []
    real = E.sample_and_grade

    def counting(*a, **kw):
        calls.append(len(a[4]))
        return real(*a, **kw)

    monkeypatch.setattr(E, "sample_and_grade", counting)
    res = _run(model_dir, out, data_dir=str(shared_data))
    assert calls == [2]  # one batch: the two damaged minerva problems; math500 untouched
    key = lambda r: (r["benchmark"], r["id"], r["sample"])  # noqa: E731
    # resumed batch = the original batch (same problems, key and shape): the same samples come back
    assert sorted(_rows(out / "samples.jsonl"), key=key) == sorted(rows, key=key)
    assert res["benchmarks"] == res0["benchmarks"]
    # a finished directory is summarised again without sampling
    calls.clear()
    _run(model_dir, out, data_dir=str(shared_data))
    assert calls == []


def test_bucket_data_and_output(first_run, model_dir, shared_data, fake_gcs):
    """--data-dir and --out on gs:// (in-memory fake of GCS): the same samples and results as on disk,
    and a torn samples object is repaired and resumed like a file."""
    from etils import epath

    out0, res0, text0 = first_run
    for name in BENCHES:
        epath.Path(f"gs://bucket/data/{name}.jsonl").write_text((shared_data / f"{name}.jsonl").read_text())
    res = _run(model_dir, "gs://bucket/eval", data_dir="gs://bucket/data")
    samples = epath.Path("gs://bucket/eval/samples.jsonl")
    assert samples.read_text() == text0
    assert res["benchmarks"] == res0["benchmarks"]
    assert json.loads(epath.Path("gs://bucket/eval/results.json").read_text())["benchmarks"] == res0["benchmarks"]
    lines = text0.splitlines(keepends=True)
    samples.write_text("".join(lines[:-N]) + lines[-1][:10])  # the last problem lost, then a torn line
    _run(model_dir, "gs://bucket/eval", data_dir="gs://bucket/data")
    assert sorted(samples.read_text().splitlines()) == sorted(text0.splitlines())


def test_errors(first_run, model_dir, shared_data, tmp_path, capsys):
    out0, _, text0 = first_run
    with pytest.raises(ConfigError, match="other settings.*temperature"):
        _run(model_dir, out0, data_dir=str(shared_data), temperature=0.5)
    with pytest.raises(ValueError, match="other settings.*n: 4"):
        _run(model_dir, out0, data_dir=str(shared_data), n=2, ks=(1,))
    assert (out0 / "samples.jsonl").read_text() == text0  # nothing was rewritten
    with pytest.raises(ConfigError, match=r"eval.k=\[1, 8\]: every k must be in \[1, eval.n=4\]"):
        _run(model_dir, tmp_path / "a", data_dir=str(shared_data), ks=(1, 8))
    with pytest.raises(ConfigError, match="aime24"):
        _run(model_dir, tmp_path / "b", data_dir=str(tmp_path), benchmarks=["aime24"])
    assert main(["eval", "--model", str(model_dir), "--out", str(out0), "--n", "2", "--k", "1", "--data-dir",
                 str(shared_data), "--benchmarks", ",".join(BENCHES), "--max-problems", "3", "--max-new-tokens", "4"]) == 2
    assert "other settings" in _one_line_error(capsys)


def test_evaluate_prompts_on_shared_batch_helper(model_dir):
    """evaluate_prompts (the trainer/demo path) runs on the same `sample_and_grade` helper."""
    from entrl.models import load_pretrained
    from entrl.sampling import Sampler, SamplingConfig
    from entrl.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    sc = SamplingConfig(n=N, max_new_tokens=NEW_TOKENS, eos_ids=tuple(tok.stop_token_ids), pad_id=tok.pad_token_id,
                        banned_ids=(tok.pad_token_id,))
    from flax import nnx

    graphdef, params = nnx.split(load_pretrained(model_dir, dtype="bfloat16"))
    prompts = [tok.encode("1+1="), tok.encode("2+2=")]
    res = evaluation.evaluate_prompts(Sampler(sc), graphdef, params, tok, prompts, ["2", "4"], verifier=StubVerifier(), n=N,
                             ks=(1, 4), buckets=BUCKETS, batch_prompts=2)
    assert res["correct"].shape == (2, N) and len(res["responses"][1]) == N
    assert res["pass@4"] == pytest.approx(np.mean([pass_at_k(N, int(c), 4) for c in res["correct"].sum(1)]))
    assert 0 < res["response_length"] <= NEW_TOKENS


def test_cli_smoke(model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "cli"
    # the shapes and dtype of the runs above (2 minerva prompts fill the 1024 bucket): no new compile
    rc = main(["eval", "--model", str(model_dir), "--benchmarks", "minerva", "--data-dir", str(shared_data),
               "--n", str(N), "--k", "1,4", "--out", str(out), "--max-new-tokens", str(NEW_TOKENS),
               "--max-problems", "2", "--batch-size", "2", "--dtype", "bfloat16", "rollout.prompt_buckets=[1024]",
               "train.progress=on"])
    assert rc == 0
    err = capsys.readouterr().err  # train.progress=on: a bar per benchmark, with count, elapsed time and ETA
    assert re.search(r"minerva: +100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), err
    res = json.loads((out / "results.json").read_text())
    assert res["benchmarks"]["minerva"]["problems"] == 2 and res["settings"]["max_new_tokens"] == NEW_TOKENS
    assert res["settings"]["dtype"] == "bfloat16" and res["ks"] == [1, 4]
    assert len(_rows(out / "samples.jsonl")) == 2 * N
    assert "| Minerva | avg@k |" in (out / "results.md").read_text()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("entrl: config error: "), err
    return err


def _hub_down(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def test_benchmark_and_k_errors_are_one_line(model_dir, shared_data, tmp_path, capsys, monkeypatch):
    """Every benchmark that cannot be read, a missing data dir and an empty or repeated eval.k: one line, exit 2,
    before the output directory or the model is touched."""
    _hub_down(monkeypatch)
    out = tmp_path / "out"
    base = ["eval", "--model", str(model_dir), "--n", "2", "--k", "1", "--max-new-tokens", "4", "--out", str(out)]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "column.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"problem": "1+1?", "answer": \n')
    cases = {(): ["aime24", "from the hub", "give eval.data_dir (--data-dir) a directory"],
             ("--benchmarks", str(tmp_path / "missing.jsonl")): ["missing.jsonl: file not found"],
             ("--benchmarks", str(tmp_path / "empty.jsonl")): ["no usable rows"],
             ("--benchmarks", str(tmp_path / "column.jsonl")): ["column 'problem'", "columns problem and answer"],
             ("--benchmarks", str(tmp_path / "broken.jsonl")): ["line 1: invalid JSON"],
             ("--benchmarks", "mini"): ["'mini'", "give eval.data_dir (--data-dir)", "built-in benchmarks: aime24"],
             ("--benchmarks", "mini", "--data-dir", str(shared_data)): [f"no {shared_data / 'mini.jsonl'} either"],
             ("--benchmarks", "minerva", "--data-dir", str(tmp_path / "nodir")): ["eval.data_dir (--data-dir) is",
                                                                                  "no such directory"],
             ("--benchmarks", "minerva", "--data-dir", str(shared_data), "rollout.prompt_buckets=[16]"): [
                 "'minerva' problem 'minerva-", "more than the largest of rollout.prompt_buckets=[16]"],
             ("--k", ""): ["eval.k is empty"],
             ("--k", "1,1"): ["eval.k=[1, 1] gives a k more than once"]}
    for args, needles in cases.items():
        assert main([*base, *args]) == 2, args
        err = _one_line_error(capsys)
        assert all(s in err for s in needles), (args, err)
        assert not out.exists(), args
    # an output directory that is a model's (or a file) is refused, the model left as it was
    readable = ["--benchmarks", "minerva", "--data-dir", str(shared_data), "--max-problems", "1"]
    before = sorted(p.name for p in model_dir.iterdir())
    for target, needle in [(model_dir, "is a model directory"), (tmp_path / "empty.jsonl", "is a file")]:
        assert main([*base[:-1], str(target), *readable]) == 2, target
        assert needle in _one_line_error(capsys)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_benchmark_read_from_data_dir_by_name(shared_data, tmp_path, monkeypatch):
    """A name that is `<data_dir>/<name>.jsonl` reads that file (built-in or not); hints name the caller's option."""
    d = tmp_path / "bench"
    d.mkdir()
    (d / "mini.jsonl").write_text("".join((shared_data / "minerva.jsonl").read_text().splitlines(keepends=True)[:2]))
    b = E.load_benchmark("mini", data_dir=str(d))
    assert (b.key, b.label, [r.id for r in b.records]) == ("mini", "mini", ["minerva-0", "minerva-1"])
    _hub_down(monkeypatch)
    with pytest.raises(ConfigError, match="give eval.data_dir a directory") as err:  # the key of `entrl train`'s val.data
        E.load_benchmark("aime24")
    assert "--data-dir" not in str(err.value)
    with pytest.raises(ConfigError, match="give --bench-dir a directory"):
        E.load_benchmark("aime24", dir_option="--bench-dir")
    with pytest.raises(ConfigError) as err:
        E.load_benchmark("aime24", dir_option="")
    assert "give" not in str(err.value) and "from the hub" in str(err.value)


def test_val_data_hint_names_eval_data_dir(monkeypatch):
    """`entrl train ... val.data=aime24` without the hub: the hint names eval.data_dir, the key it reads."""
    from entrl.rl.setup import build_val_set

    _hub_down(monkeypatch)
    cfg = C.load_config(None, ["train.eval_every=1", "val.data=aime24"])
    with pytest.raises(ConfigError, match=r"val.data='aime24': .*give eval.data_dir a directory") as err:
        build_val_set(cfg, tokenizer=None)
    assert "--data-dir" not in str(err.value)


def test_resume_checks_the_weights(first_run, model_dir, shared_data, tmp_path, monkeypatch):
    """Samples on disk are reused only for the same weights (a fingerprint in run.json), not the same path:
    a run's policy/ changes as it trains on."""
    import shutil

    from entrl.models import ModelConfig, create_model, save_pretrained

    out0, res0, text0 = first_run
    model = tmp_path / "policy"
    shutil.copytree(model_dir, model)
    out = tmp_path / "eval"
    out.mkdir()
    run = json.loads((out0 / "run.json").read_text())
    assert len(run["settings"]["weights"]) == 32
    run["settings"].update(model=str(model.resolve()), tokenizer=str(model))  # as if evaluated from this path
    (out / "run.json").write_text(json.dumps(run))
    (out / "samples.jsonl").write_text(text0)
    calls = []
    monkeypatch.setattr(E, "sample_and_grade", lambda *a, **kw: calls.append(a))
    # the same weights, sharded another way (fsdp, not replicated): summarised again, nothing sampled
    res = _run(model, out, data_dir=str(shared_data), mesh_data=1, mesh_fsdp=-1)
    assert calls == [] and res["benchmarks"] == res0["benchmarks"]
    save_pretrained(create_model(ModelConfig.from_pretrained(model), seed=1), model)  # "trained one more step"
    with pytest.raises(ConfigError, match="other settings.*weights: fingerprint"):
        _run(model, out, data_dir=str(shared_data))
    del run["settings"]["weights"]  # run.json of an entrl that did not record the weights
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="weights: no fingerprint on disk"):
        _run(model, out, data_dir=str(shared_data))
    assert calls == [] and (out / "samples.jsonl").read_text() == text0


def test_top_k_reaches_the_sampler_and_is_a_resume_setting(first_run, model_dir, shared_data, tmp_path):
    """eval.top_k (the release's OpenCompass sampling is top_p 0.9, top_k 50): top_k=1 at T = 1 samples the
    greedy response n times; samples on disk drawn with another top_k are refused; a run.json written
    before top_k was recorded reads as top_k 0 (its samples stay usable)."""
    out0, res0, text0 = first_run
    _run(model_dir, tmp_path / "greedy", data_dir=str(shared_data), temperature=0.0)
    top1 = _run(model_dir, tmp_path / "top1", data_dir=str(shared_data), top_k=1)
    assert top1["settings"]["top_k"] == 1 and res0["settings"]["top_k"] == 0
    by_problem = {}
    for r in _rows(tmp_path / "top1" / "samples.jsonl"):
        by_problem.setdefault((r["benchmark"], r["id"]), set()).add(r["response"])
    assert all(len(v) == 1 for v in by_problem.values())  # every sample of a problem the same
    greedy_rows = {}
    for r in _rows(tmp_path / "greedy" / "samples.jsonl"):
        greedy_rows.setdefault((r["benchmark"], r["id"]), set()).add(r["response"])
    assert greedy_rows == by_problem
    with pytest.raises(ConfigError, match="top_k: 1 on disk vs 50 now"):
        _run(model_dir, tmp_path / "top1", data_dir=str(shared_data), top_k=50)
    old = tmp_path / "old"
    old.mkdir()
    run = json.loads((out0 / "run.json").read_text())
    del run["settings"]["top_k"]
    (old / "run.json").write_text(json.dumps(run))
    (old / "samples.jsonl").write_text(text0)
    assert _run(model_dir, old, data_dir=str(shared_data))["benchmarks"] == res0["benchmarks"]
    del run["settings"]["timeout_s"]  # nor the grader's time limit: the 5 s of then, not this run's 10 s
    (old / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match=r"timeout_s: not recorded on disk \(an older entrl, which used 5.0\) vs 10.0"):
        _run(model_dir, old, data_dir=str(shared_data), timeout_s=10.0)


def test_resume_refuses_samples_of_other_problems_and_unreadable_files(first_run, model_dir, shared_data, tmp_path):
    """Samples on disk belong to the problem they were drawn for: an edited benchmark file (another reference or
    problem under the same id) is refused, and so are samples without the run.json that says how they were drawn,
    a line that is not a sample row and a run.json that is not one: one-line config errors, nothing sampled."""
    import shutil

    out0, res0, text0 = first_run
    assert all(len(r["problem_digest"]) == 16 for r in _rows(out0 / "samples.jsonl"))
    edited = tmp_path / "data"
    edited.mkdir()
    for name in BENCHES:
        rows = _rows(shared_data / f"{name}.jsonl")
        if name == BENCHES[0]:
            rows[0]["answer"] = "a corrected answer"
        (edited / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    shutil.copytree(out0, out)
    with pytest.raises(ConfigError, match=f"benchmark '{BENCHES[0]}' problem .* drawn for another problem or "
                                          "reference answer"):
        _run(model_dir, out, data_dir=str(edited))
    run_json = (out / "run.json").read_text()
    (out / "run.json").unlink()
    with pytest.raises(ConfigError, match="holds samples.jsonl but no run.json"):
        _run(model_dir, out, data_dir=str(shared_data))
    (out / "run.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a run.json of entrl eval"):
        _run(model_dir, out, data_dir=str(shared_data))
    (out / "run.json").write_text(run_json)
    (out / "samples.jsonl").write_text(text0 + '{"benchmark": "minerva", "id": "x", "sample": 0}\n')
    with pytest.raises(ConfigError, match=r"line \d+: not a sample row of entrl eval \(.*no reference"):
        _run(model_dir, out, data_dir=str(shared_data))
    assert (out / "samples.jsonl").read_text().startswith(text0)  # nothing rewritten
