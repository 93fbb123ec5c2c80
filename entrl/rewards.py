"""Verifiable rewards: final-answer extraction and math-verify grading in a process pool.

Design decisions:
- Extraction takes the content of the LAST complete `\\boxed{...}` / `\\fbox{...}`
  (also `\\boxed {..}` and the brace-less `\\boxed 5`), nested braces matched; when
  there is none, the rest of the line after the last `Answer:`. It is linear in
  the response length (one vectorised prefix-depth pass, no recursion, no
  backtracking regex), so a 1 MB response or 10,000 nested braces cost
  milliseconds. A truncated response whose last box never closes falls back to
  the last box that did close.
- `answers_equivalent(pred, gold)` is one implementation shared by training,
  evaluation and semantic-entropy clustering: a normalised-string fast path, an
  exact-rational fast path (integers, decimals, `a/b`, `\\frac{a}{b}`, `4.4e7`,
  `4.4\\times10^{7}`), then math-verify `verify(parse(gold), parse(pred))` with
  LaTeX extraction only (see `_parse`).
  Negative fast path: two different integers, or two rationals that differ by
  more than 1e-5 relative (math-verify rounds to 6 decimals and calls `1/3`
  and `0.333333` equal; such near misses are left to it).
- math-verify's own timeouts use `signal.alarm` (main thread only), so they are
  disabled and the pool enforces them: `Verifier` runs math-verify in worker
  processes, one job at a time each, with a per-item deadline. A worker past its
  deadline is SIGKILLed and replaced; a crashed worker is replaced. The job
  counts as incorrect (`timeout` / `error`) and the caller never blocks longer
  than the timeout per wave.
- Workers are plain `python -c` subprocesses talking length-prefixed pickles over
  pipes, not `multiprocessing`: spawn/forkserver children re-import the parent's
  `__main__` (for the `entrl` console script that means the trainer and JAX),
  and fork is unsafe under JAX's threads. A worker imports only this module,
  numpy and math-verify. It lives in its own session so Ctrl-C reaches only the
  parent, and exits when its stdin closes (parent gone, between jobs).
- A worker never outlives its parent, even mid-job (a SIGKILLed or OOM-killed
  trainer leaves no worker burning a CPU inside sympy): on Linux it asks the
  kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG; this works
  while the job holds the GIL in C code), and everywhere a daemon thread polls
  `os.getppid()` every 0.2 s and exits when it changed. The kernel signal fires
  when the parent *thread* that spawned the worker exits, so it is only asked
  for when the pool is started from the main thread; other threads rely on the
  poll. The parent's pid is passed in, so a parent that died before the worker
  got this far is noticed too.
- Timeouts are finite and > 0 (`timeout_s=nan` would disable every deadline).
- Answers longer than `MAX_ANSWER_CHARS` or nested deeper than
  `MAX_BRACE_DEPTH` braces are rejected before parsing: math-verify needs ~10 s
  for 10 bare nested braces and minutes for more. The longest reference answer
  in the six benchmarks is 210 characters with depth 3.
- Identical (answer, reference) pairs in one call are verified once.
- A lone surrogate (`"\\boxed{\\ud800}"`, invalid Unicode that no tokenizer
  emits but a caller's string may hold) never raises: extraction reads it like
  any character and the answer is graded `rejected`.

- Reward functions from config (`reward.fn`, `RewardFn`): the reward is
  `sum_k weight_k * fn_k(response, reference, record)` over plain callables
  named `package.module:function` (the current directory is searched last, as
  `python -m` would; the console script's path lacks it) or
  `path/to/file.py:function` (loaded under a private module name, so two files
  of the same name do not clash). They run in the same worker pool, one call
  per job with the same per-item deadline: a hung, crashing or raising function,
  or one returning a non-number, scores 0 for that response and is counted
  (`RewardResult.failed`), never a hang. They travel by name (the init frame
  carries the `module:function` strings) and each worker imports them once.
  `math_reward` is the default term; named in `reward.fn` it is graded by the
  pool's own math path (fast paths, rejection, identical pairs once) with the
  values `reward.correct` / `reward.incorrect`, which is what calling it would
  return. Accuracy, evaluation and semantic-entropy clustering always use the
  math equivalence, whatever the reward terms are.

Left out on purpose: relative-tolerance grading of rounded physics answers
(Minerva) and LLM judges; both plug in as the answer equivalence
(`reward.equivalent=package.module:function`, or `Verifier(equivalent=...)`)
or as a reward function.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from multiprocessing.connection import wait as wait_readable

import numpy as np

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 8

Equivalent = Callable[[str, str], bool]

# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*")
_BARE_TOKEN_RE = re.compile(r"[^\s$]+")
_ANSWER_RE = re.compile(r"answer[ \t*]*[:：][ \t]*([^\n]*)", re.IGNORECASE)


def _prefix_depth(text: str) -> np.ndarray:
    """Brace depth after each character of `text` (int32, same length)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    step = (codes == ord("{")).astype(np.int32) - (codes == ord("}")).astype(np.int32)
    return np.cumsum(step, dtype=np.int32)


def extract_answer(text: str) -> str | None:
    """Final answer of a response: last complete `\\boxed{}`/`\\fbox{}`, else last `Answer:` line.

    Returns the stripped content (possibly with LaTeX), or None when there is
    no answer (no box, an empty box, no `Answer:` line).
    """
    boxes = list(_BOX_RE.finditer(text))
    if boxes:
        start = boxes[0].start()
        depth = None  # computed lazily: most boxes close, so the scan below is short
        for m in reversed(boxes):
            p = m.end()
            if p >= len(text):
                continue
            if text[p] != "{":
                tok = _BARE_TOKEN_RE.match(text, p)
                if tok and tok.group(0)[0] != "}":
                    return tok.group(0).rstrip(".,;")
                continue
            if depth is None:
                depth = _prefix_depth(text[start:])
                # suffix minimum of the depth: the box opened at p closes iff the
                # depth later drops below its depth right after `{`.
                suffix_min = np.minimum.accumulate(depth[::-1])[::-1]
            q = p - start
            d = depth[q]
            if q + 1 >= len(depth) or suffix_min[q + 1] >= d:
                continue  # unclosed (truncated response)
            close = q + 1 + int(np.argmax(depth[q + 1 :] < d))
            content = text[p + 1 : close + start].strip()
            return content or None
    found = None
    for found in _ANSWER_RE.finditer(text):  # noqa: B007 (the loop keeps the last match)
        pass
    if found is None:
        return None
    content = found.group(1).strip().strip("*").strip()
    content = content.strip("$").strip().rstrip(".").strip().strip("$").strip()  # "$42$." -> 42
    return content or None


# ---------------------------------------------------------------------------
# Normalisation and fast paths
# ---------------------------------------------------------------------------

_NORMALIZE_SUBS = [
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?"), ""),
    (re.compile(r"\\[,;:! ]|~"), ""),
    (re.compile(r"\\displaystyle(?![A-Za-z])"), ""),
    (re.compile(r"\s+"), ""),
]
_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}$")


def normalize_answer(s: str) -> str:
    """Conservative canonical form for exact-match comparison (never for display).

    Strips `$`, whitespace and spacing commands, `\\left`/`\\right`, `^\\circ`, a
    trailing period, and one `\\text{...}`-style wrapper spanning the whole
    answer; maps `\\dfrac`/`\\tfrac` to `\\frac`. Units and anything that could
    change the value are left to math-verify.
    """
    s = s.strip().rstrip(".").strip().strip("$")
    for pattern, repl in _NORMALIZE_SUBS:
        s = pattern.sub(repl, s)
    s = s.rstrip(".")
    m = _WRAPPER_RE.match(s)
    return m.group(1) if m else s


_REL_GAP = Fraction(1, 10**5)
_INT_RE = re.compile(r"[+-]?\d+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_TIMES10_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:\\times|\\cdot|\*)10\^\{?([+-]?\d{1,3})\}?")
_SLASH_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))/(\d+\.?\d*)")
_FRAC_RE = re.compile(r"(-?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{(\d+)\}|(\d))")


def _as_rational(norm: str) -> Fraction | None:
    """Exact value of a normalised plain number, or None when it is not one."""
    try:
        if _DEC_RE.fullmatch(norm):
            return Fraction(norm)
        if m := _TIMES10_RE.fullmatch(norm):
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
        if m := _SLASH_RE.fullmatch(norm):
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if m := _FRAC_RE.fullmatch(norm):
            num = int(m.group(2) or m.group(3))
            den = int(m.group(4) or m.group(5))
            return Fraction(-num if m.group(1) else num, den)
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    return None


def fast_equivalence(pred: str, gold: str) -> bool | None:
    """Decide cheaply when possible: True/False, or None = ask math-verify. Symmetric."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b:
        return True
    if len(a) > 64 or len(b) > 64:  # keeps Fraction on huge digit strings out of the hot path
        return None
    ra, rb = _as_rational(a), _as_rational(b)
    if ra is not None and rb is not None:
        if ra == rb:
            return True
        if _INT_RE.fullmatch(a) and _INT_RE.fullmatch(b):
            return False
        if abs(ra - rb) > _REL_GAP * max(1, abs(ra), abs(rb)):
            return False  # too far apart for math-verify's 6-decimal rounding to call equal
    return None


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def is_pathological(answer: str) -> bool:
    """True for answers math-verify must not see (too long, too deeply nested, or not valid Unicode)."""
    if len(answer) > MAX_ANSWER_CHARS or _SURROGATE_RE.search(answer):
        return True
    depth = deepest = 0
    for ch in answer:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth -= 1
    return deepest > MAX_BRACE_DEPTH


# ---------------------------------------------------------------------------
# math-verify
# ---------------------------------------------------------------------------

_MV = None


def _math_verify():
    """Import math-verify once, with its signal-based timeouts (and their warnings) off."""
    global _MV
    if _MV is None:
        import math_verify  # noqa: PLC0415 (seconds to import with sympy; only what verifies needs it)
        import math_verify.grader  # noqa: PLC0415 (seconds to import with sympy; only what verifies needs it)
        import math_verify.parser  # noqa: PLC0415 (seconds to import with sympy; only what verifies needs it)

        # We pass timeout=None on purpose (see module docstring); silence its one-time warning.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        _MV = math_verify
    return _MV


_LATEX_ONLY = None


def _parse(s: str):
    """Parse an extracted answer as one LaTeX formula.

    LaTeX extraction only: math-verify's default also runs its expression
    extractor, which on a formula latex2sympy cannot read picks some number out
    of it (`-1./3` -> -1; a Minerva formula -> 2, which then "equals" any other
    formula that also yields 2). Unreadable answers stay strings instead and
    compare as strings.
    """
    global _LATEX_ONLY
    mv = _math_verify()
    if _LATEX_ONLY is None:
        _LATEX_ONLY = [mv.LatexExtractionConfig()]
    return mv.parse(f"${s}$", extraction_config=_LATEX_ONLY, parsing_timeout=None, raise_on_error=True)


def math_verify_equivalent(pred: str, gold: str, *, both_directions: bool = False) -> bool:
    """math-verify's `verify(parse(gold), parse(pred))` (and the reverse when asked). May raise."""
    mv = _math_verify()
    g, p = _parse(gold), _parse(pred)
    if not g or not p:
        return False
    ok = mv.verify(g, p, timeout_seconds=None, raise_on_error=True)
    if ok and both_directions:
        ok = mv.verify(p, g, timeout_seconds=None, raise_on_error=True)
    return bool(ok)


def answers_equivalent(pred: str, gold: str, *, both_directions: bool = False) -> bool:
    """Is the extracted answer `pred` equivalent to the reference `gold`? Never raises.

    Fast paths first (`fast_equivalence`), then math-verify in this process with
    no timeout; pathological answers are False without parsing. `verify` is
    asymmetric (`(1,2)` vs `1<x<2`), so clustering passes `both_directions=True`.
    """
    try:
        decided = fast_equivalence(pred, gold)
        if decided is not None:
            return decided
        if is_pathological(pred) or is_pathological(gold):
            return False
        return math_verify_equivalent(pred, gold, both_directions=both_directions)
    except Exception:
        return False


def answers_equivalent_both(a: str, b: str) -> bool:
    """Symmetric equivalence (both directions verify): the relation used for clustering."""
    return answers_equivalent(a, b, both_directions=True)


# ---------------------------------------------------------------------------
# Reward functions: fn(response, reference, record) -> float
# ---------------------------------------------------------------------------

MATH_REWARD = "entrl.rewards:math_reward"
RewardCallable = Callable[[str, str, dict], float]
# `package.module:function` or `path/to/file.py:function` (`entrl.config` checks the same pattern)
_SPEC_RE = re.compile(r"(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:]+\.py):[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def math_reward(response: str, reference: str, record: dict) -> float:
    """1.0 when the response's final answer (`extract_answer`) is equivalent to `reference`, else 0.0.

    The default reward term. Named in `reward.fn` it is not called like the others: the `Verifier`
    grades it itself (see the module docstring), with `reward.correct` / `reward.incorrect` as values.
    """
    answer = extract_answer(response)
    return float(answer is not None and answers_equivalent(answer, reference))


_FORMAT_TAIL_RE = re.compile(r"(?:\s|\$|\.|\*|\\\]|\\\))*")


def boxed_format_reward(response: str, reference: str, record: dict) -> float:
    """1.0 when the response ends with its one and only complete `\\boxed{...}`, else 0.0.

    Exactly one `\\boxed` / `\\fbox` in the whole response, written `\\boxed{...}` with its braces
    closed around a non-empty answer, and nothing after the closing brace but whitespace, `$`, `.`,
    `*`, `\\]` or `\\)` (so `... is $\\boxed{5}$.` scores 1; a second box, a truncated box, a brace-less
    `\\boxed 5` or text after the box score 0). Correctness is not looked at: pair it with
    `math_reward`, e.g. `reward.fn=[entrl.rewards:math_reward, entrl.rewards:boxed_format_reward]`
    with `reward.weights=[1.0, 0.1]`.
    """
    boxes = list(_BOX_RE.finditer(response))
    if len(boxes) != 1:
        return 0.0
    p = boxes[0].end()
    if response[p:p + 1] != "{" or not response.startswith("\\boxed", boxes[0].start()):
        return 0.0
    depth = _prefix_depth(response[p:])
    closed = np.flatnonzero(depth == 0)
    if closed.size == 0:
        return 0.0
    close = p + int(closed[0])
    if not response[p + 1:close].strip():
        return 0.0
    return 1.0 if _FORMAT_TAIL_RE.fullmatch(response, close + 1) else 0.0


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _import_reward_module(name: str):
    """The module of a reward spec: a `.py` file (path relative to the current directory) loaded under a
    private name, or a dotted module looked up on the Python path and then in the current directory."""
    if name.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(name))
        key = "_entrl_reward_" + re.sub(r"\W", "_", path)
        if key in sys.modules:
            return sys.modules[key]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it, as `import` does (dataclasses and pickling look it up)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # the console script's path lacks it; `python -m` has it
        sys.path.append(cwd)  # last: never shadows an installed package
    return importlib.import_module(name)


def _absolute_spec(spec: str) -> str:
    """`spec` with a `.py` file's path made absolute (module specs unchanged)."""
    module, attr = spec.rsplit(":", 1)
    return f"{os.path.abspath(os.path.expanduser(module))}:{attr}" if module.endswith(".py") else spec


def resolve_reward_fn(spec: str, *, args: tuple[str, ...] = ("response", "reference", "record")) -> RewardCallable:
    """The callable named `package.module:function` or `path/to/file.py:function` (imported now).
    ValueError in one line when it is not of that form, does not import, has no such attribute, is not
    callable, or cannot be called with the positional `args` (a reward's; an equivalence takes (pred, gold))."""
    if not isinstance(spec, str) or not _SPEC_RE.fullmatch(spec):
        raise ValueError(f"{spec!r} is not of the form package.module:function or path/to/file.py:function")
    module_name, attr = spec.rsplit(":", 1)
    try:
        obj = _import_reward_module(module_name)
    except (Exception, SystemExit) as e:  # ModuleNotFoundError, or anything the module raises while importing
        raise ValueError(f"{spec!r}: cannot import {module_name!r} ({type(e).__name__}: {_one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a function")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: called as they are
        return obj
    try:
        signature.bind(*args)
    except TypeError:
        raise ValueError(f"{spec!r} takes {signature}; it is called as fn({', '.join(args)})") from None
    return obj


@dataclasses.dataclass(frozen=True)
class RewardFn:
    """One term of the reward: `weight * fn(response, reference, record)`, fn named by `spec`."""

    spec: str  # "package.module:function"
    weight: float = 1.0
    name: str = ""  # metric name (`reward/<name>`); "" = the function's name

    @property
    def label(self) -> str:
        return self.name or self.spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]


def reward_fns(specs: Sequence[str], weights: Sequence[float] = ()) -> tuple[RewardFn, ...]:
    """The terms of `reward.fn` / `reward.weights` (empty weights = 1.0 each), each resolved once
    (ValueError in one line when one does not import). Two terms whose functions share a name are
    labelled by their full spec."""
    if weights and len(weights) != len(specs):
        raise ValueError(f"{len(weights)} weights for {len(specs)} reward functions")
    if weights and not any(weights):
        raise ValueError(f"weights {list(weights)} are all 0: every response would get the same reward")
    for spec in specs:
        resolve_reward_fn(spec)
    short = [spec.rsplit(":", 1)[1].rsplit(".", 1)[-1] for spec in specs]
    return tuple(RewardFn(spec, float(w), name if short.count(name) == 1 else spec)
                 for spec, w, name in zip(specs, weights or [1.0] * len(specs), short))


def _call_reward(fn: RewardCallable, response: str, reference: str, record: dict) -> float | tuple[str, str]:
    """fn's value as a float, or ("error", why) when it raised or returned a non-finite or non-number."""
    try:
        value = fn(response, reference, record)
    except Exception as e:
        return "error", _one_line(f"{type(e).__name__}: {e}")
    if not isinstance(value, (numbers.Real, np.bool_)):
        return "error", f"returned a {type(value).__name__}, not a number"
    value = float(value)
    return value if math.isfinite(value) else ("error", f"returned {value}")


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------

_HEADER = struct.Struct(">I")
_BOOT = "from entrl.rewards import _worker_main; _worker_main()"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_S = 0.2


def _write_frame(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int):
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _die_with_parent(parent_pid: int, kernel_signal: bool) -> None:
    """Exit as soon as the parent process is gone, even in the middle of a job (module docstring)."""
    if kernel_signal and sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415 (Linux-only worker setup)

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl (unusual libc): the poll below still works
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=poll, name="entrl-parent-watchdog", daemon=True).start()


def _worker_main() -> None:
    """Loop of a verification worker: an init frame (equivalent, reward fn specs), then job frames
    (job id, payload) answered with (job id, result); see `_execute`.

    argv: the parent's pid, then 1 when the parent-death signal may be used (spawned from the main thread).
    """
    if len(sys.argv) >= 3:
        _die_with_parent(int(sys.argv[1]), sys.argv[2] == "1")
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from parsers and reward functions must not corrupt the result pipe
    in_fd = sys.stdin.fileno()
    init = _read_frame(in_fd)
    if init is None:
        return
    equivalent, specs = init
    try:
        if isinstance(equivalent, str):  # reward.equivalent, named like a reward function
            equivalent = resolve_reward_fn(equivalent, args=("pred", "gold"))
        fns = [resolve_reward_fn(spec) for spec in specs]  # imported once per worker
    except ValueError as e:  # imports in the parent, not here (e.g. defined in a notebook cell or __main__)
        _write_frame(out_fd, ("init_error", str(e)))
        os._exit(1)
    if equivalent is math_verify_equivalent:
        math_verify_equivalent("\\frac{1}{2}", "0.5")  # pay sympy's first-call cost before "ready"
    _write_frame(out_fd, "ready")
    while (job := _read_frame(in_fd)) is not None:
        job_id, payload = job
        _write_frame(out_fd, (job_id, _execute(equivalent, fns, payload)))


def _execute(equivalent: Equivalent, fns: Sequence[RewardCallable], payload: tuple):
    """One job. ("eq", pred, gold, both) -> a status (`_run_job`); ("fn", k, response, reference,
    record) -> reward function k's value or ("error", why) (`_call_reward`)."""
    if payload[0] == "eq":
        return _run_job(equivalent, *payload[1:])
    _, k, response, reference, record = payload
    return _call_reward(fns[k], response, reference, record)


def _run_job(equivalent: Equivalent, pred: str, gold: str, both: bool) -> str:
    """Status of one equivalence job: correct / incorrect, or error when the grader raised."""
    try:
        if both and equivalent is math_verify_equivalent:
            ok = math_verify_equivalent(pred, gold, both_directions=True)  # parses each side once
        else:
            ok = bool(equivalent(pred, gold)) and (not both or bool(equivalent(gold, pred)))
        return "correct" if ok else "incorrect"
    except Exception:  # any failure of the grader (parser bug, RecursionError) is an "error" result
        return "error"


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    ready: bool = False
    job: int | None = None
    deadline: float = 0.0

    @property
    def out_fd(self) -> int:
        return self.proc.stdout.fileno()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------

STATUSES = ("correct", "incorrect", "no_answer", "rejected", "timeout", "error", "ungraded")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Rewards of one batch. `status[i]` is one of STATUSES; `counts` tallies them plus `total`.

    `correct` / `status` are the math grading. From `Verifier.score_rewards`, `rewards` is the weighted
    sum of the reward terms, `components` holds each term's own values and `failed` the rows where a
    reward function failed (scored 0); without the math term `graded` is False, nothing is correct and
    answered rows are "ungraded".
    """

    rewards: np.ndarray  # float32 [N]
    correct: np.ndarray  # bool [N]
    answers: list[str | None]  # extracted final answers
    status: list[str]
    counts: dict[str, int]
    components: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # term label -> float32 [N], unweighted
    failed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # label of a reward function -> bool [N]
    graded: bool = True  # the math term is among the reward terms (accuracy means something)


class WorkerImportError(ValueError):
    """A reward function or answer equivalence that imports in this process but not in a verification worker
    (a fresh interpreter): defined in a notebook cell or in `__main__`, or on a path only this process has."""

    def __init__(self, why: str):
        super().__init__(f"{why}: it imports here but not in the verification worker processes (a fresh Python); "
                         "define it in a module or a .py file and name it package.module:function or "
                         "path/to/file.py:function, not in a notebook cell or __main__")


class Verifier:
    """Grades responses against reference answers with per-item timeouts in worker processes.

    workers: 0 = min(cpu count, 8) processes; k > 0 = k processes; None = serial in
    this process (no timeouts: for benchmarks and trusted inputs).
    equivalent: `(pred, gold) -> bool` run in the workers, as a picklable top-level function or named
    like a reward function (`package.module:function` or `path/to/file.py:function`, imported now and by
    each worker; `reward.equivalent`); None = `answers_equivalent` (fast paths in the parent,
    math-verify in workers). It grades the math answer everywhere: accuracy, `math_reward`, evaluation and
    semantic-entropy clustering.
    rewards: the terms of `score_rewards` (`RewardFn`s; default: `math_reward` alone), resolved
    here (ValueError when one does not import); the other methods grade the math answer only.
    Workers start on first use and stay alive across calls; use as a context
    manager or call `close()`. Not thread-safe: one calling thread at a time.
    """

    def __init__(
        self,
        workers: int | None = 0,
        timeout_s: float = 5.0,
        correct: float = 1.0,
        incorrect: float = 0.0,
        *,
        equivalent: Equivalent | str | None = None,
        rewards: Sequence[RewardFn] = (RewardFn(MATH_REWARD),),
        start_timeout_s: float = 120.0,
    ):
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a finite number of seconds > 0")
        if workers is not None and workers < 0:
            raise ValueError(f"workers={workers}: must be >= 0 or None (serial)")
        if not rewards:
            raise ValueError("rewards: need at least one reward term")
        self.n_workers = None if workers is None else (workers or min(os.cpu_count() or 1, 8))
        self.timeout_s = float(timeout_s)
        self.correct_reward = float(correct)
        self.incorrect_reward = float(incorrect)
        if isinstance(equivalent, str):  # by name: resolved here (errors now), re-imported by the workers
            self._worker_equivalent: Equivalent | str = _absolute_spec(equivalent)
            equivalent = resolve_reward_fn(equivalent, args=("pred", "gold"))
        else:
            self._worker_equivalent = equivalent or math_verify_equivalent
        self._custom = equivalent
        self._equivalent = equivalent or math_verify_equivalent
        self.rewards = tuple(rewards)
        resolved = [resolve_reward_fn(r.spec) for r in self.rewards]
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rewards: two terms share a label ({labels}); give them distinct names")
        self._math_terms = [r for r, fn in zip(self.rewards, resolved) if fn is math_reward]
        if len(self._math_terms) > 1:
            raise ValueError("rewards: math_reward is named twice")
        # Terms called in the workers (by name), with their callables for serial mode.
        self._fn_terms = [r for r, fn in zip(self.rewards, resolved) if fn is not math_reward]
        self._fns = [fn for fn in resolved if fn is not math_reward]
        # What the workers import: file specs made absolute now (a later chdir of this process changes nothing).
        self._worker_specs = [_absolute_spec(t.spec) for t in self._fn_terms]
        self._warned: set[tuple[str, str]] = set()
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._next_job = 0
        self.restarts = 0  # workers replaced after a timeout or crash (for metrics)

    # -- public -----------------------------------------------------------------

    def score(self, responses: Sequence[str], references: Sequence[str]) -> RewardResult:
        """Extract each response's final answer and grade it against its reference (math only)."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses vs {len(references)} references")
        answers = [extract_answer(r) for r in responses]
        jobs = [(a, ref, False) for a, ref in zip(answers, references) if a is not None]
        graded = iter(self._grade(jobs))
        status = ["no_answer" if a is None else next(graded) for a in answers]
        return self._result(answers, status)

    def score_rewards(self, responses: Sequence[str], references: Sequence[str],
                      records: Sequence[dict] | None = None) -> RewardResult:
        """The configured reward of each response: `sum_k weight_k * fn_k(response, reference, record)`.

        `records[i]` is the prompt's row (None = empty dicts). The math term and every reward
        function's calls share one pass over the pool; a function that times out, crashes, raises
        or returns a non-number scores 0 there and is flagged in `failed` (and logged once per
        function and kind of failure).
        """
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses vs {len(references)} references")
        records = [{}] * len(responses) if records is None else list(records)
        if len(records) != len(responses):
            raise ValueError(f"{len(records)} records for {len(responses)} responses")
        answers = [extract_answer(r) for r in responses]
        eq_jobs = [(a, ref, False) for a, ref in zip(answers, references) if a is not None] if self._math_terms else []
        unique, eq_todo = self._triage(eq_jobs)
        fn_jobs = [("fn", k, resp, ref, rec) for k in range(len(self._fns))
                   for resp, ref, rec in zip(responses, references, records)]
        results = self._run([("eq", *key) for key in eq_todo] + fn_jobs)
        unique.update(zip(eq_todo, results[:len(eq_todo)]))
        graded = iter([unique[j] for j in eq_jobs])
        status = ["no_answer" if a is None else next(graded) if self._math_terms else "ungraded" for a in answers]
        out = self._result(answers, status)
        components, failed = {}, {}
        total = np.zeros(len(responses), np.float64)
        if self._math_terms:
            term = self._math_terms[0]
            components[term.label] = out.rewards
            total += term.weight * out.rewards
        per_fn = len(responses)
        for k, term in enumerate(self._fn_terms):
            values, bad = self._fn_values(term, results[len(eq_todo) + k * per_fn:len(eq_todo) + (k + 1) * per_fn])
            components[term.label], failed[term.label] = values, bad
            total += term.weight * values
        return dataclasses.replace(out, rewards=total.astype(np.float32), components=components, failed=failed,
                                   graded=bool(self._math_terms))

    def check(self, preds: Sequence[str], golds: Sequence[str], *, both_directions: bool = False) -> list[str]:
        """Status of each (extracted answer, reference) pair; see STATUSES."""
        return self._grade([(p, g, both_directions) for p, g in zip(preds, golds, strict=True)])

    def equivalent_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Symmetric equivalence of answer pairs, in parallel; a timeout or error is False.

        Plugs into `semantic_entropy.cluster_answer_groups(pairs_equivalent=...)`.
        """
        return [s == "correct" for s in self._grade([(a, b, True) for a, b in pairs])]

    def start(self) -> None:
        """Start the worker processes now and wait until each has imported the reward functions and the
        answer equivalence (they otherwise start on first use), with the pool's own start-up handling:
        `WorkerImportError` when one cannot import them, RuntimeError when they keep failing to start. A
        no-op in serial mode."""
        if self.n_workers is not None:
            self._run_pool([], until_ready=True)

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals --------------------------------------------------------------

    def _result(self, answers: list[str | None], status: list[str]) -> RewardResult:
        correct = np.array([s == "correct" for s in status], dtype=bool)
        rewards = np.where(correct, self.correct_reward, self.incorrect_reward).astype(np.float32)
        counts = {s: status.count(s) for s in STATUSES}
        counts["total"] = len(status)
        return RewardResult(rewards, correct, answers, status, counts)

    def _fn_values(self, term: RewardFn, results: list) -> tuple[np.ndarray, np.ndarray]:
        """A reward function's values (0 where it failed) and its failure flags; the first failure of
        each kind (raised, returned a bad value, timed out, killed its worker) is logged with the reason."""
        values = np.zeros(len(results), np.float32)
        bad = np.zeros(len(results), bool)
        for i, r in enumerate(results):
            if isinstance(r, float):
                values[i] = r
                continue
            bad[i] = True
            # the pool's "timeout" / "error" (the worker died), or `_call_reward`'s ("error", why)
            kind = ("crash" if r == "error" else r) if isinstance(r, str) else \
                "returned" if r[1].startswith("returned") else "raised"
            if (term.label, kind) not in self._warned:
                self._warned.add((term.label, kind))
                why = (f"took longer than reward.timeout_s={self.timeout_s:g} s" if kind == "timeout"
                       else f"failed: {r[1]}" if isinstance(r, tuple) else "crashed its worker process")
                log.warning("reward function %s %s; such responses score 0 (counted as reward_failures/%s, "
                            "logged once)", term.spec, why, term.label)
        return values, bad

    def _triage(self, jobs: list[tuple[str, str, bool]]) -> tuple[dict, list]:
        """({job: status or None}, the jobs the pool must grade): fast paths and rejections decided here."""
        unique: dict[tuple[str, str, bool], str | None] = dict.fromkeys(jobs)
        todo = []
        for key in unique:
            pred, gold, both = key
            decided = None if self._custom else fast_equivalence(pred, gold)
            if decided is not None:
                unique[key] = "correct" if decided else "incorrect"
            elif is_pathological(pred) or (both and is_pathological(gold)):
                unique[key] = "rejected"
            else:
                todo.append(key)
        return unique, todo

    def _grade(self, jobs: list[tuple[str, str, bool]]) -> list[str]:
        unique, todo = self._triage(jobs)
        if todo:
            unique.update(zip(todo, self._run([("eq", *key) for key in todo])))
        return [unique[j] for j in jobs]

    def _run(self, payloads: list[tuple]) -> list:
        """`_execute` of every payload, in the pool (or serially); a killed job is "timeout", a crash "error"."""
        if not payloads:
            return []
        if self.n_workers is None:
            return [_execute(self._equivalent, self._fns, p) for p in payloads]
        return self._run_pool(payloads)

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        # the child sees the parent's import path (editable installs, test dirs)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        main_thread = threading.current_thread() is threading.main_thread()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(os.getpid()), "1" if main_thread else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            start_new_session=True,
        )
        worker = _Worker(proc, deadline=time.monotonic() + self.start_timeout_s)
        try:
            _write_frame(proc.stdin.fileno(), (self._worker_equivalent, self._worker_specs))
        except OSError:
            pass  # died at once: noticed as EOF by the loop
        return worker

    def _run_pool(self, todo: list[tuple], *, until_ready: bool = False) -> list:
        while len(self._workers) < self.n_workers:
            self._workers.append(self._spawn())
        results: list[str | None] = [None] * len(todo)
        pending = list(range(len(todo)))[::-1]  # stack; pop() takes the lowest index first
        ids: dict[int, int] = {}  # job id -> index in todo
        start_failures = 0
        while pending or any(w.job is not None or (until_ready and not w.ready) for w in self._workers):
            now = time.monotonic()
            for w in self._workers:  # dispatch
                if w.ready and w.job is None and pending:
                    i = pending.pop()
                    job_id, self._next_job = self._next_job, self._next_job + 1
                    ids[job_id] = i
                    try:
                        _write_frame(w.proc.stdin.fileno(), (job_id, todo[i]))
                        w.job, w.deadline = job_id, now + self.timeout_s
                    except OSError:
                        pending.append(i)
                        w.ready, w.deadline = False, now  # replaced below as a failed start
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic()) if waiting else 0.0
            readable = wait_readable([w.out_fd for w in waiting], wait_s)
            now = time.monotonic()
            for k, w in enumerate(self._workers):
                if w.out_fd in readable:
                    msg = _read_frame(w.out_fd)
                    if msg == "ready":
                        w.ready, start_failures = True, 0
                        continue
                    if not w.ready and isinstance(msg, tuple) and msg[0] == "init_error":
                        self.close()
                        raise WorkerImportError(msg[1])
                    if msg is not None and msg[0] == w.job:
                        results[ids.pop(w.job)] = msg[1]
                        w.job = None
                        continue
                    # EOF or garbage: the worker crashed
                    if w.job is not None:
                        results[ids.pop(w.job)] = "error"
                    elif not w.ready:
                        start_failures += 1
                    self._replace(k)
                elif now >= w.deadline and (w.job is not None or not w.ready):
                    if w.job is not None:
                        results[ids.pop(w.job)] = "timeout"
                    else:
                        start_failures += 1
                    self._replace(k)
            if start_failures > 2 * self.n_workers:
                self.close()
                raise RuntimeError(
                    f"verification workers failed to start {start_failures} times "
                    f"(`{sys.executable} -c '{_BOOT}'`); see their stderr above"
                )
        return results  # type: ignore[return-value]

    def _replace(self, k: int) -> None:
        self._workers[k].kill()
        self._workers[k] = self._spawn()
        self.restarts += 1
