"""Verification throughput: serial in-process vs the verifier pool, on the six eval sets' real answers.

Responses are synthetic but shaped like model output: ~300 words of reasoning
(inline math, braces, a decoy intermediate `\\boxed{}`), ending in the boxed
reference (verbatim or reformatted), a perturbed wrong answer, or no box at all.
Each reference gets `--group` responses, as a GRPO group would.

Two workloads:
- mixed: the production path (normalised-string / rational fast paths in the
  parent, math-verify only for the rest);
- math-verify: every extracted answer goes through math-verify (fast paths
  off), the worst case for a batch of unusual answers.

Usage: python benchmarks/bench_rewards.py [--refs 100] [--group 4] [--reps 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

from entrl.rewards import Verifier, extract_answer, fast_equivalence, math_verify_equivalent

SETS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
DATA = Path(os.environ.get("ENTRL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

_FILLER = (
    "We first restate the problem and name the unknown quantity. Let $x$ denote it and write the constraint "
    "as $f(x) = \\frac{{a}}{{b}} + {n}$ with $a, b > 0$. Expanding the product gives $x^2 - {n}x + {m} = 0$, and "
    "by Vieta the roots satisfy $x_1 + x_2 = {n}$ and $x_1 x_2 = {m}$. Checking the boundary case "
    "$\\left\\{{x \\mid x \\geq 0\\right\\}}$ we see the minimum is attained, so an intermediate value is "
    "${m}$ for the subproblem. Now we substitute back, simplify the nested radicals "
    "$\\sqrt{{{n} + \\sqrt{{{m}}}}}$, and verify each step carefully, keeping track of signs and of the "
    "domain. "
)


def _reasoning(rng: random.Random, problem: str) -> str:
    words = problem.split()[:60]
    parts = ["Let's think step by step. " + " ".join(words)]
    for _ in range(3):
        n, m = rng.randint(2, 99), rng.randint(2, 999)
        parts.append(_FILLER.format(n=n, m=m))
    return "\n\n".join(parts)


def _reformat(answer: str) -> str:
    """The reference as a model might write it: spacing, \\dfrac, \\left/\\right, dollars."""
    s = answer.replace("\\frac", "\\dfrac").replace(",", ", ")
    s = re.sub(r"^\((.*)\)$", r"\\left(\1\\right)", s)
    return s


def _perturb(rng: random.Random, answer: str) -> str:
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if digits:
        i = rng.choice(digits)
        return answer[:i] + str((int(answer[i]) + rng.randint(1, 8)) % 10) + answer[i + 1 :]
    return answer + "+1"


def build_workload(refs: int, group: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    rows = []
    for name in SETS:
        rows += [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    rows = rng.sample(rows, min(refs, len(rows)))  # a fresh sample per seed
    responses, references = [], []
    for row in rows:
        for _ in range(group):
            kind = rng.choices(["verbatim", "reformatted", "wrong", "none"], weights=[35, 15, 40, 10])[0]
            body = _reasoning(rng, row["problem"])
            if kind == "none":
                responses.append(body + " I am not able to finish the computation.")
            else:
                answer = {"verbatim": row["answer"], "reformatted": _reformat(row["answer"])}.get(kind)
                answer = answer or _perturb(rng, row["answer"])
                decoy = f"The subproblem gives $\\boxed{{{rng.randint(2, 99)}}}$, which we now use.\n\n"
                responses.append(body + decoy + f"Therefore, the final answer is $\\boxed{{{answer}}}$.")
            references.append(row["answer"])
    return responses, references


def _time(verifier: Verifier, workloads, reps: int) -> tuple[float, dict]:
    """Median wall time of `score` over fresh workloads (parse caches never see a batch twice)."""
    verifier.score(*workloads[0])  # warm-up batch: first-call costs of sympy / the pool
    times = []
    for responses, references in workloads[1 : reps + 1]:
        t0 = time.perf_counter()
        result = verifier.score(responses, references)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result.counts


def _slow_path_share(responses, references) -> float:
    """Fraction of answered items that the fast paths leave to math-verify."""
    pairs = [(extract_answer(r), g) for r, g in zip(responses, references)]
    pairs = [(a, g) for a, g in pairs if a is not None]
    return sum(fast_equivalence(a, g) is None for a, g in pairs) / max(1, len(pairs))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", type=int, default=100, help="reference answers sampled from the six sets")
    p.add_argument("--group", type=int, default=4, help="responses per reference")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--workers", type=int, default=0, help="pool size (0 = min(cpus, 8))")
    p.add_argument("--timeout", type=float, default=5.0, help="per-item timeout of the pool (s)")
    args = p.parse_args(argv)

    workloads = [build_workload(args.refs, args.group, seed) for seed in range(args.reps + 1)]
    responses, references = workloads[1]
    n = len(responses)
    words = statistics.mean(len(r.split()) for r in responses)
    print(f"{n} responses per batch ({args.refs} references x {args.group}), mean {words:.0f} words, "
          f"{_slow_path_share(responses, references):.0%} of answers need math-verify; "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} python={sys.version.split()[0]}")

    t0 = time.perf_counter()
    pool = Verifier(workers=args.workers, timeout_s=args.timeout)
    pool.check(["(1,2)"], ["(1,2]"])  # forces the workers up
    startup = time.perf_counter() - t0
    forced_pool = Verifier(workers=args.workers, timeout_s=args.timeout, equivalent=math_verify_equivalent)
    print(f"pool of {pool.n_workers} workers ready in {startup:.2f} s (paid once per Verifier)\n")

    rows = []
    for name, serial, pooled in [
        ("mixed", Verifier(workers=None), pool),
        ("math-verify", Verifier(workers=None, equivalent=math_verify_equivalent), forced_pool),
    ]:
        t_serial, counts = _time(serial, workloads, args.reps)
        t_pool, counts_pool = _time(pooled, workloads, args.reps)
        rows.append((name, n / t_serial, n / t_pool, t_serial / t_pool, counts, counts_pool))
    pool.close()
    forced_pool.close()

    print(f"| workload | serial verif/s | pool verif/s ({args.workers or 'auto'}) | pool/serial | "
          "correct | no_answer | timeout (pool) | error (pool) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s, q, ratio, c, cp in rows:
        print(f"| {name} | {s:.0f} | {q:.0f} | {ratio:.2f}x | {c['correct']}/{c['total']} | {c['no_answer']} | "
              f"{cp['timeout']} | {cp['error']} |")


if __name__ == "__main__":
    main()
