"""Rewards: extraction, equivalence on real answer formats, and the verifier pool's failure handling.

The hooks below (`_sleepy_equivalent`, ...) are top-level so the pool's worker
processes can import them from this module by reference.
"""

import json
import os
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrl import rewards
from entrl.rewards import Verifier, answers_equivalent, extract_answer, fast_equivalence, normalize_answer


def _sleepy_equivalent(pred: str, gold: str) -> bool:
    if pred == "hang":
        time.sleep(600)
    if pred == "crash":
        os._exit(3)
    if pred == "raise":
        raise RuntimeError("grader bug")
    return pred == gold


def _jax_loaded(pred: str, gold: str) -> bool:
    return "jax" in sys.modules or "flax" in sys.modules


def _respond(answer: str | None) -> str:
    """A realistic response: some reasoning, then the boxed answer (or none)."""
    body = "Let us set up the equation. Expanding gives $x^2 - 5x + 6 = 0$, so {x : x = 2 or 3}.\n" * 3
    return body + ("I could not finish." if answer is None else f"Therefore the answer is $\\boxed{{{answer}}}$.")


@pytest.fixture(scope="module")
def pool():
    with Verifier(workers=2, timeout_s=20.0) as v:
        yield v


# -- extraction ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\left(\\frac{3}{5},\\frac{8}{3}\\right]}", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]"),
        ("nested \\boxed{a{b{c}}d} tail", "a{b{c}}d"),
        ("\\fbox{7}", "7"),
        ("\\boxed {12}.", "12"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed{1} then a truncated \\boxed{2", "1"),
        ("\\boxed{}", None),
        ("no final answer here", None),
        ("Answer: 42.", "42"),
        ("The answer: $42$.", "42"),
        ("Answer: 1\nwait, **Final Answer:** $x = 3$\nmore text", "x = 3"),
        ("\\boxed{3}\nAnswer: 4", "3"),
        ("\\boxedfoo{3}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _naive_last_box(text: str) -> str | None:
    """Quadratic reference: last `\\boxed{` whose braces close, scanned char by char."""
    i = text.rfind("\\boxed{")
    while i >= 0:
        depth, j = 0, i + len("\\boxed")
        for j in range(i + len("\\boxed"), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                content = text[i + len("\\boxed{") : j].strip()
                return content or None
        i = text.rfind("\\boxed{", 0, i)
    return None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed{", "{", "}", "x", "1", " "]), max_size=30))
def test_extract_matches_naive_reference(parts):
    text = "".join(parts)
    assert extract_answer(text) == _naive_last_box(text)


def test_extract_is_linear_on_pathological_text():
    cases = [
        "word " * 200_000 + "\\boxed{5}",  # 1 MB response
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # 10,000 nested braces
        "\\boxed" + "{" * 1_000_000,  # never closes
        "\\boxed{" * 100_000,  # 100k unclosed boxes
    ]
    for text in cases:
        # CPU time of this process: other jobs on a shared machine stretch wall time (a loaded
        # 2-core box once took 2.4 s wall here), while a quadratic scan of these inputs would
        # need far more than 2 s of CPU.
        t0 = time.process_time()
        extract_answer(text)
        assert time.process_time() - t0 < 2.0


# -- normalisation and fast paths ---------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("$\\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert normalize_answer("\\left( 3, \\frac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("90^\\circ") == normalize_answer("90^{\\circ}") == "90"
    assert normalize_answer("\\text{Evelyn}") == "Evelyn"
    assert normalize_answer("x \\rightarrow y") == "x\\rightarrowy"  # \right inside \rightarrow kept


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("1/2", "0.5", True),
        ("\\frac12", "\\dfrac{1}{2}", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("4.4e7", "4.4\\times10^{7}", True),
        ("25", "025", True),
        ("-1./3", "-\\frac{1}{3}", True),  # Minerva writes decimals over integers
        ("3", "4", False),
        ("0.5", "-\\frac{1}{2}", False),
        ("12.001", "12", False),
        ("1/3", "0.333333", None),  # near miss: left to math-verify (its rounding says equal)
        ("(1,2)", "1<x<2", None),
    ],
)
def test_fast_equivalence(a, b, expected):
    assert fast_equivalence(a, b) is expected
    assert fast_equivalence(b, a) is expected


# -- real answer formats -------------------------------------------------------------------

# id -> (an equivalent answer in another form, a wrong answer)
REAL_CASES = {
    "test/intermediate_algebra/558.json": ("(3, 4]", "(3,4)"),  # interval
    "test/algebra/2486.json": ("(3/5, 8/3]", "[\\frac{3}{5},\\frac{8}{3}]"),  # interval, fractions
    "test/intermediate_algebra/183.json": ("(2, \\infty)", "[2,\\infty)"),
    "test/intermediate_algebra/956.json": ("(6, 31, -1)", "(6,-31,1)"),  # tuple
    "test/algebra/1349.json": ("\\text{Evelyn}", "\\text{Bob}"),  # text
    "test/algebra/2036.json": ("\\sqrt{117}", "3\\sqrt{31}"),  # radical
    "test/prealgebra/1458.json": ("0.125", "\\frac{1}{6}"),  # fraction
    "test/precalculus/927.json": ("90", "45^\\circ"),  # degrees
    "olympiadbench-1929": ("(3,2), (1,1)", "(1,1)"),  # set of tuples, any order
    "olympiadbench-2391": ("15, 5", "5, 16"),  # multiple answers
    "olympiadbench-2410": ("\\left[\\frac12, 8\\right]", "(\\frac{1}{2}, 8)"),
    "olympiadbench-1970": ("(-\\infty,0)\\cup\\{1\\}", "(-\\infty,0)"),  # union
    "olympiadbench-2706": ("\\frac{9\\sqrt{3}}{20}", "\\frac{9\\sqrt{2}}{20}"),
    "minerva-60": ("4.4 \\times 10^{7}", "4.5e7"),  # scientific notation
    "minerva-67": ("1 + i\\sqrt{3}", "1-\\sqrt{3} i"),  # complex
    "minerva-249": ("\\frac{-1+K}{L}", "\\frac{K+1}{L}"),  # symbolic
    "minerva-14": ("0.003", "0.03"),
    # math-verify's default expression extractor reads this formula as "2", so any other
    # unreadable formula ending in 2 "matched"; LaTeX-only parsing compares it as a string
    "minerva-261": (
        "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}",
        "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{6 m \\omega^{2}}",
    ),
    "minerva-38": ("-\\frac{1}{3}", "-1"),
}


@pytest.fixture(scope="module")
def real_answers(shared_data):
    out = {}
    for name in ("math500", "olympiadbench", "minerva"):
        for line in (shared_data / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["id"] in REAL_CASES:
                out[row["id"]] = row["answer"]
    assert set(out) == set(REAL_CASES)
    return out


def test_real_formats_through_pool(pool, real_answers):
    ids = list(REAL_CASES)
    responses, references, expected = [], [], []
    for id_ in ids:
        good, bad = REAL_CASES[id_]
        for answer, ok in ((real_answers[id_], True), (good, True), (bad, False)):
            responses.append(_respond(answer))
            references.append(real_answers[id_])
            expected.append(ok)
    result = pool.score(responses, references)
    wrong = [(references[i], result.answers[i]) for i in range(len(expected)) if result.correct[i] != expected[i]]
    assert not wrong
    assert result.counts["timeout"] == result.counts["error"] == 0


def test_answers_equivalent_never_raises():
    assert answers_equivalent("\\frac{1}{", "1") is False
    assert answers_equivalent("{" * 20 + "1" + "}" * 20, "1") is False  # rejected, not parsed


# -- scoring -------------------------------------------------------------------------------


def test_score_result_and_reward_values(pool):
    responses = [_respond("\\frac{1}{2}"), _respond("3"), _respond(None), "Answer: 0.5"]
    result = pool.score(responses, ["0.5", "4", "1", "1/2"])
    assert result.status == ["correct", "incorrect", "no_answer", "correct"]
    assert result.rewards.dtype == np.float32 and result.correct.dtype == bool
    assert result.rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert result.answers[2] is None
    assert result.counts == {"correct": 2, "incorrect": 1, "no_answer": 1, "rejected": 0, "timeout": 0,
                             "error": 0, "ungraded": 0, "total": 4}
    signed = Verifier(workers=None, correct=1.0, incorrect=-1.0)
    assert signed.score(responses, ["0.5", "4", "1", "1/2"]).rewards.tolist() == [1.0, -1.0, -1.0, 1.0]


def test_serial_mode_matches_pool(pool, real_answers):
    golds = [real_answers[i] for i in ("test/algebra/2036.json", "olympiadbench-2410")]
    preds = ["\\sqrt{117}", "(\\frac{1}{2}, 8)"]
    assert Verifier(workers=None).check(preds, golds) == pool.check(preds, golds) == ["correct", "incorrect"]


def test_equivalent_pairs_is_symmetric(pool):
    # verify((1,2), 1<x<2) holds one way only; clustering needs both
    assert pool.equivalent_pairs([("1/2", "0.5"), ("x+1", "1+x"), ("(1,2)", "1<x<2")]) == [True, True, False]


def test_pathological_inputs_are_incorrect_and_fast(pool, monkeypatch):
    responses = [
        "word " * 200_000 + "\\boxed{" + "1+" * 300_000 + "1}",  # 1 MB response with a huge answer
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # 10,000 nested braces
        "\\boxed{\\frac{1}{}^^_\\sqrt}",  # invalid LaTeX
        _respond("2"),
    ]
    t0 = time.perf_counter()
    result = pool.score(responses, ["1", "1", "1", "2"])
    assert time.perf_counter() - t0 < pool.timeout_s
    assert result.correct.tolist() == [False, False, False, True]
    assert result.status[:2] == ["rejected", "rejected"]

    # Without the guard, math-verify itself hangs on nested braces: the deadline kills it.
    monkeypatch.setattr(rewards, "MAX_BRACE_DEPTH", 10**9)
    monkeypatch.setattr(pool, "timeout_s", 1.0)
    restarts = pool.restarts
    t0 = time.perf_counter()
    result = pool.score(["\\boxed{" + "{" * 40 + "1" + "}" * 40 + "}", _respond("7")], ["1", "7"])
    assert time.perf_counter() - t0 < 10.0
    assert result.status == ["timeout", "correct"]
    assert result.counts["timeout"] == 1 and pool.restarts == restarts + 1


def test_hung_and_crashed_workers_are_replaced():
    with Verifier(workers=1, timeout_s=1.0, equivalent=_sleepy_equivalent) as v:
        t0 = time.perf_counter()
        status = v.check(["hang", "a", "crash", "b", "raise", "c"], ["x", "a", "x", "x", "x", "c"])
        elapsed = time.perf_counter() - t0
        assert status == ["timeout", "correct", "error", "incorrect", "error", "correct"]
        assert v.restarts == 2  # the hung one and the crashed one; a raised exception keeps the worker
        assert elapsed < 15.0
        assert v.check(["d"], ["d"]) == ["correct"]  # still serving


def test_workers_do_not_import_jax():
    assert "jax" in sys.modules  # the parent (conftest) has JAX loaded
    with Verifier(workers=1, equivalent=_jax_loaded) as v:
        assert v.check(["a"], ["a"]) == ["incorrect"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Verifier(timeout_s=0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite"):
            Verifier(timeout_s=bad)
    with pytest.raises(ValueError, match="finite"):
        Verifier(start_timeout_s=float("inf"))
    with pytest.raises(ValueError):
        Verifier(workers=-1)
    with pytest.raises(ValueError):
        Verifier(workers=None).score(["a"], [])


def test_pool_plugs_into_clustering(pool):
    from entrl.semantic_entropy import cluster_answers

    answers = ["\\sqrt{117}", "3\\sqrt{13}", "(1,2)", "1<x<2", None, "(1, 2)"]
    assert cluster_answers(answers, pairs_equivalent=pool.equivalent_pairs) == [0, 0, 1, 2, 3, 1]


# -- workers never outlive their parent -------------------------------------------

_PARENT_SCRIPT = """
import sys, threading
sys.path.insert(0, {tmp!r})
from stuck import stuck_equivalent
from entrl.rewards import Verifier

def grade():
    Verifier(workers=1, timeout_s=3600, equivalent=stuck_equivalent).check(["x"], ["y"])

if {from_thread!r}:
    t = threading.Thread(target=grade)
    t.start()
    t.join()
else:
    grade()
"""

_STUCK_MODULE = """
import os, re, time

def stuck_equivalent(pred, gold):
    with open({pid_file!r}, "w") as f:
        f.write(str(os.getpid()))
    if {hold_gil!r}:
        # catastrophic backtracking inside the C regex engine: holds the GIL for ever
        return re.match(r"(a+)+$", "a" * 64 + "b") is not None
    while True:  # pure Python: the GIL is released every few ms
        time.sleep(0)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie nobody reaps is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("case", ["main_thread_gil_held", "other_thread_python"])
def test_worker_dies_with_its_parent_mid_job(tmp_path, case):
    """SIGKILL the trainer while its worker is stuck in a job: the worker is gone within seconds.

    From the main thread the kernel's parent-death signal does it (the job holds the GIL, so no
    Python code of the worker can run); from another thread the worker's watchdog thread does it.
    """
    import signal
    import subprocess

    pid_file = tmp_path / "worker.pid"
    hold_gil = case == "main_thread_gil_held"
    (tmp_path / "stuck.py").write_text(_STUCK_MODULE.format(pid_file=str(pid_file), hold_gil=hold_gil))
    script = _PARENT_SCRIPT.format(tmp=str(tmp_path), from_thread=not hold_gil)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None, "the parent exited before its worker started the job"
            assert time.monotonic() < deadline, "the worker never started the job"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        time.sleep(0.5)
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        while _alive(worker) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert not _alive(worker), f"worker {worker} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_lone_surrogates_are_graded_not_raised(pool):
    result = pool.score(["so \\boxed{\ud800}", "Answer: 1\udfff", _respond("2")], ["1", "1", "2"])
    assert result.status == ["rejected", "rejected", "correct"]
    assert result.counts["rejected"] == 2
    assert pool.check(["\ud800"], ["1"]) == ["rejected"]


# -- reward functions from config (reward.fn) --------------------------------------

_REWARD_MODULE = '''
import os, time


def length(response, reference, record):
    return len(response) / 10


def level_if_right(response, reference, record):
    return float(record["level"]) if reference in response else 0.0


def flaky(response, reference, record):
    if "raise" in response:
        raise KeyError("no such column")
    if "string" in response:
        return "1.0"
    if "nan" in response:
        return float("nan")
    if "hang" in response:
        time.sleep(600)
    if "crash" in response:
        os._exit(3)
    return True
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(_REWARD_MODULE)
    return str(path)


@pytest.mark.parametrize("response, expected", [
    ("so the answer is $\\boxed{5}$.", 1.0),
    ("\\boxed{\\frac{1}{2}}", 1.0),
    ("\\[ x = \\boxed{3} \\]", 1.0),
    ("**\\boxed{7}**\n", 1.0),
    ("\\boxed{5} and then more text", 0.0),  # text after the box
    ("\\boxed{4} no, \\boxed{5}", 0.0),  # two boxes
    ("\\boxed{}", 0.0),  # empty
    ("\\boxed{  }", 0.0),
    ("\\boxed{5", 0.0),  # truncated
    ("\\boxed 5", 0.0),  # brace-less
    ("\\fbox{5}", 0.0),  # not \boxed
    ("Answer: 5", 0.0),
])
def test_boxed_format_reward(response, expected):
    assert rewards.boxed_format_reward(response, "5", {}) == expected


def test_reward_functions_weighted_in_the_pool(reward_file):
    """The reward is sum_k weight_k * fn_k(response, reference, record), each fn called in the workers with the
    prompt's row; components hold each term unweighted; the math term keeps grading (status, accuracy)."""
    specs = [rewards.MATH_REWARD, f"{reward_file}:length", f"{reward_file}:level_if_right"]
    terms = rewards.reward_fns(specs, [1.0, 0.5, 2.0])
    assert [t.label for t in terms] == ["math_reward", "length", "level_if_right"]
    responses = [_respond("7"), _respond("8"), _respond(None)]
    records = [{"id": "a", "level": 3}, {"id": "b", "level": 4}, {"id": "c", "level": 5}]
    refs = ["7", "7", "Let"]  # the third reference occurs in its response: level_if_right pays
    with Verifier(workers=1, timeout_s=20.0, rewards=terms) as v:
        res = v.score_rewards(responses, refs, records)
    math = np.array([1.0, 0.0, 0.0])
    length = np.array([len(r) / 10 for r in responses])
    level = np.array([3.0, 0.0, 5.0])
    np.testing.assert_allclose(res.rewards, math + 0.5 * length + 2.0 * level, rtol=1e-6)
    np.testing.assert_allclose(res.components["length"], length, rtol=1e-6)
    np.testing.assert_array_equal(res.components["level_if_right"], level)
    np.testing.assert_array_equal(res.components["math_reward"], math)
    assert res.status == ["correct", "incorrect", "no_answer"] and res.graded
    assert not any(f.any() for f in res.failed.values())
    serial = Verifier(workers=None, rewards=terms).score_rewards(responses, refs, records)  # same without a pool
    np.testing.assert_array_equal(serial.rewards, res.rewards)


def test_reward_function_failures_score_zero_and_are_counted(reward_file, caplog):
    """A reward function that raises, returns a non-number or NaN, hangs past reward.timeout_s or kills its
    worker scores 0 there, is flagged, and is logged once per kind; the math term and the pool carry on."""
    import logging

    terms = rewards.reward_fns([rewards.MATH_REWARD, f"{reward_file}:flaky"])
    responses = [_respond(x) for x in ("1", "raise", "string", "nan", "hang", "crash", "2")]
    with Verifier(workers=1, timeout_s=2.0, rewards=terms) as v, caplog.at_level(logging.WARNING, "entrl.rewards"):
        t0 = time.perf_counter()
        res = v.score_rewards(responses, ["1"] * 7)
        assert time.perf_counter() - t0 < 20.0
        again = v.score_rewards(responses[:2], ["1"] * 2)  # same failures: no new log lines
    np.testing.assert_array_equal(res.components["flaky"], [1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(res.failed["flaky"], [False, True, True, True, True, True, False])
    np.testing.assert_array_equal(res.rewards, [2, 0, 0, 0, 0, 0, 1])
    assert res.status[0] == "correct" and res.status[-1] == "incorrect"
    assert again.failed["flaky"].tolist() == [False, True]
    logged = [r.getMessage() for r in caplog.records if "flaky" in r.getMessage()]
    assert len(logged) == 4, logged  # raised, returned a bad value (string and nan), timed out, crashed: once each
    assert any("KeyError: 'no such column'" in m for m in logged)
    assert any("returned a str, not a number" in m for m in logged)
    assert any("reward.timeout_s=2" in m for m in logged) and any("crashed" in m for m in logged)


def test_reward_functions_without_the_math_term(reward_file):
    """Without math_reward nothing is graded: no response counts as correct, answered ones are 'ungraded'."""
    with Verifier(workers=None, rewards=rewards.reward_fns([f"{reward_file}:length"])) as v:
        res = v.score_rewards([_respond("7"), "no box"], ["7", "7"])
    assert not res.graded and not res.correct.any() and res.status == ["ungraded", "no_answer"]
    np.testing.assert_allclose(res.rewards, [len(_respond("7")) / 10, 0.6], rtol=1e-6)
    assert list(res.components) == ["length"]


def test_reward_specs_resolve_or_fail_in_one_line(tmp_path, reward_file, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    cases = {
        "no colon": "entrl.rewards.math_reward",
        "no such module": "no_such_module_xyz:f",
        "no such attribute": "entrl.rewards:no_such_fn",
        "not callable": "entrl.rewards:MAX_ANSWER_CHARS",
        "raises on import": f"{tmp_path / 'raises_on_import.py'}:f",
        "exits on import": f"{tmp_path / 'exits_on_import.py'}:f",
        "no such file": f"{tmp_path / 'missing.py'}:f",
    }
    for name, spec in cases.items():
        with pytest.raises(ValueError) as err:
            rewards.resolve_reward_fn(spec)
        assert "\n" not in str(err.value), (name, str(err.value))
    with pytest.raises(ValueError, match="2 weights for 1"):
        rewards.reward_fns([rewards.MATH_REWARD], [1.0, 2.0])
    with pytest.raises(ValueError, match="all 0"):
        rewards.reward_fns([rewards.MATH_REWARD], [0.0])
    assert rewards.resolve_reward_fn(f"{reward_file}:length")("abc", "", {}) == 0.3
    # A module in the current directory imports by name, as with `python -m` (the console script's path lacks it).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert rewards.resolve_reward_fn("my_rewards:length")("abcd", "", {}) == 0.4
    assert rewards.resolve_reward_fn("my_rewards.py:length")("ab", "", {}) == 0.2
    with Verifier(workers=1, rewards=rewards.reward_fns(["my_rewards.py:length"])) as v:
        monkeypatch.chdir("/")  # the workers start later, elsewhere: the file is found where it was named
        assert v.score_rewards(["abcde"], ["x"]).rewards.tolist() == [0.5]


def test_config_checks_the_same_reward_spec_form():
    from entrl import config as C

    assert C._REWARD_SPEC_RE.pattern == rewards._SPEC_RE.pattern
    assert C.MATH_REWARD == rewards.MATH_REWARD


_CHOICE_MODULE = '''
def same_letter(pred, gold):
    """Multiple choice: the same option letter, whatever the case and parentheses."""
    return pred.strip("() ").upper() == gold.strip("() ").upper()
'''


def test_answer_equivalence_from_config(tmp_path):
    """`reward.equivalent` (a file's function, by name) replaces math-verify wherever the math answer is graded:
    `math_reward` in the workers and serially, accuracy, and the SE clustering's pairs; a bad name is a one-line
    ConfigError before anything starts; `entrl eval` reads the same key."""
    from entrl import config as C
    from entrl.rl.setup import build_verifier

    (tmp_path / "choices.py").write_text(_CHOICE_MODULE)
    spec = f"{tmp_path / 'choices.py'}:same_letter"
    cfg = C.load_config(None, ["reward.workers=1", f"reward.equivalent={spec}"])
    responses = [_respond("b)"), _respond("C"), _respond("( b )")]
    with build_verifier(cfg) as v:
        res = v.score_rewards(responses, ["B", "B", "(B)"])
        pairs = v.equivalent_pairs([("a)", "A"), ("a", "b")])
    assert res.status == ["correct", "incorrect", "correct"] and res.rewards.tolist() == [1.0, 0.0, 1.0]
    assert pairs == [True, False]
    serial = Verifier(workers=None, equivalent=spec).score(responses, ["B", "B", "(B)"])
    assert serial.status == res.status
    # The default (math-verify) calls "b)" and "B" different answers.
    assert Verifier(workers=None).score(responses[:1], ["B"]).status == ["incorrect"]
    with pytest.raises(C.ConfigError, match="reward.equivalent") as err:
        build_verifier(C.load_config(None, [f"reward.equivalent={tmp_path / 'missing.py'}:f"]))
    assert "\n" not in str(err.value)
    with pytest.raises(C.ConfigError, match="reward.equivalent"):
        C.load_config(None, ["reward.equivalent=not a spec"])


def test_reward_code_only_this_process_has_fails_in_one_line(monkeypatch):
    """A reward function that imports here but not in a fresh worker (a notebook cell, `__main__`, a module made at
    run time): one-line WorkerImportError when the pool starts (the trainer's `build_verifier` starts it before any
    compile, as a ConfigError), not three failed restarts and a RuntimeError pointing at stderr."""
    import types

    from entrl import config as C
    from entrl.rl.setup import build_verifier

    mod = types.ModuleType("entrl_test_injected_rewards")
    mod.always = lambda response, reference, record: 1.0
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    terms = rewards.reward_fns([rewards.MATH_REWARD, f"{mod.__name__}:always"])  # resolves here
    with pytest.raises(rewards.WorkerImportError, match="not in a notebook cell") as err:
        Verifier(workers=1, rewards=terms).score_rewards([_respond("1")], ["1"])
    assert "\n" not in str(err.value)
    cfg = C.load_config(None, ["reward.workers=1", f"reward.fn=[{rewards.MATH_REWARD}, {mod.__name__}:always]"])
    t0 = time.perf_counter()
    with pytest.raises(C.ConfigError, match="imports here but not in the verification worker"):
        build_verifier(cfg)
    assert time.perf_counter() - t0 < 60
    assert Verifier(workers=None, rewards=terms).score_rewards([_respond("1")], ["1"]).rewards.tolist() == [2.0]
