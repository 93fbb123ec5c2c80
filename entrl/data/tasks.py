"""Prompt construction, prompt tokenization, and the synthetic arithmetic task of the demo.

Design decisions:
- A plain-text problem becomes the problem, a separator and the SENT
  instruction suffix (docs/method.md, "Evaluation"), rendered as one user message of the
  tokenizer's chat template with a generation prompt. The separator is a
  newline; an empty suffix adds nothing, so the demo's prompt for `3+4*2` with
  the character tokenizer is exactly `3+4*2=` (its chat template appends `=`).
- A chat prompt (a record with `messages`: verl's and TRL's conversational
  datasets) is rendered through the chat template exactly as given, with a
  generation prompt, and the suffix is NOT added: such prompts carry their
  own instruction (DAPO's asks for an `Answer:` line, which the verifier
  reads), and appending another one would give the model two competing
  formats. A chat prompt cannot be used with `chat_template=False` (there is
  no faithful plain-text form of a list of turns): that is a ValueError.
- Token ids come from rendering the text and encoding it without adding
  special tokens (`encode_prompt`): chat templates write their own BOS/role
  tokens as text. No BOS is prepended by default, so `encode_prompt` and
  `tokenizer.encode(build_prompt(...))` give the same ids (the demo's SFT
  warm-start encodes its prompts the second way). `add_bos=True` prepends the
  tokenizer's BOS when it has one and the prompt does not already start with
  it (for raw prompts of BOS-trained base models); never twice.
- Prompts longer than `max_prompt_len` tokens are dropped with a logged count
  or rejected with a ValueError naming the row; kept records stay aligned
  with their token lists (index i of both is the same prompt).

The arithmetic task:
- Problems are integer expressions like `3+4*2` with min..max_operands (default 2..3) operands in
  1..max_number and operators from `ops` (`*` binds tighter than `+`/`-`,
  which are left-associative). The reference answer is the exact value.
- Splits are disjoint by construction: a problem's split is a fixed hash of
  its text (20% "heldout"), independent of the seed, so no text is in both
  splits for any seeds. Within a split, `make_problems(n, seed, split)` draws
  distinct problems with a generator seeded by (seed, split); it raises when
  the split has fewer than n distinct problems.
- The worked solution evaluates products left to right first, then sums and
  differences left to right, one `a op b=c` step each, comma separated, then
  ` \\boxed{answer}`: `3+4*2` -> `4*2=8,3+8=11 \\boxed{11}`. It carries no EOS;
  the caller appends it when building training targets.
- `noisy_solution` imitates a weak teacher: with probability `error_rate` it
  makes one realistic mistake (one step's result off by 1 or 2, later steps
  computed correctly from the wrong value; or left-to-right evaluation that
  ignores precedence when that changes the result) and boxes the result of
  its own steps. Every mistake changes the boxed answer, so the fraction of
  wrong boxed answers is the error rate.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from entrl.data.sources import Record

log = logging.getLogger(__name__)

SENT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


Prompt = str | Sequence[Mapping[str, str]]  # a plain-text problem, or chat messages ({"role", "content"})


def build_prompt(problem: Prompt, tokenizer, *, suffix: str = SENT_SUFFIX, chat_template: bool = True) -> str:
    """Problem + newline + suffix, as a single user turn of the chat template when `chat_template`;
    chat messages through the chat template as given (no suffix; see the module docstring)."""
    if not isinstance(problem, str):
        if not chat_template:
            raise ValueError("a chat-message prompt needs the tokenizer's chat template: set "
                             "data.chat_template=true, or read a plain-text problem column")
        return tokenizer.apply_chat_template([dict(m) for m in problem], tokenize=False, add_generation_prompt=True)
    content = f"{problem}\n{suffix}" if suffix else problem
    if not chat_template:
        return content
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return text


def encode_prompt(problem: Prompt, tokenizer, *, suffix: str = SENT_SUFFIX, chat_template: bool = True,
                  add_bos: bool = False) -> list[int]:
    """Token ids of `build_prompt(...)`, with the tokenizer's BOS prepended (once) when `add_bos`."""
    ids = tokenizer.encode(build_prompt(problem, tokenizer, suffix=suffix, chat_template=chat_template))
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


class TokenizedPrompts(NamedTuple):
    tokens: list[list[int]]  # one id list per kept record
    records: list[Record]  # the kept records, aligned with `tokens`
    dropped: int  # prompts longer than max_prompt_len that were dropped


def tokenize_prompts(
    records: Sequence[Record],
    tokenizer,
    *,
    max_prompt_len: int,
    on_long_prompt: str = "drop",
    suffix: str = SENT_SUFFIX,
    chat_template: bool = True,
    add_bos: bool = False,
) -> TokenizedPrompts:
    """Token ids of every record's prompt; too-long prompts dropped (counted, logged) or a ValueError."""
    if on_long_prompt not in ("drop", "error"):
        raise ValueError(f"on_long_prompt={on_long_prompt!r}: must be 'drop' or 'error'")
    if max_prompt_len <= 0:
        raise ValueError(f"max_prompt_len={max_prompt_len}: must be positive")
    tokens: list[list[int]] = []
    kept: list[Record] = []
    dropped: list[str] = []
    for i, rec in enumerate(records):
        try:
            ids = encode_prompt(rec.prompt, tokenizer, suffix=suffix, chat_template=chat_template, add_bos=add_bos)
        except ValueError as e:
            raise ValueError(f"row {i} (id={rec.id!r}): {e}") from None
        if len(ids) > max_prompt_len:
            if on_long_prompt == "error":
                raise ValueError(
                    f"row {i} (id={rec.id!r}): prompt has {len(ids)} tokens > max_prompt_len={max_prompt_len}; "
                    "raise data.max_prompt_len or set data.on_long_prompt=drop"
                )
            dropped.append(rec.id)
            continue
        tokens.append(ids)
        kept.append(rec)
    if dropped:
        log.warning("dropped %d of %d prompts longer than %d tokens (first: %s)",
                    len(dropped), len(records), max_prompt_len, dropped[:5])
    return TokenizedPrompts(tokens, kept, len(dropped))


# ---------------------------------------------------------------------------
# Synthetic arithmetic task
# ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\d+|[-+*]")
_HELDOUT_PER_MILLE = 200


def _tokens(problem: str) -> tuple[list[int], list[str]]:
    parts = _TOKEN.findall(problem)
    if "".join(parts) != problem or len(parts) % 2 == 0:
        raise ValueError(f"not an arithmetic problem of the form 'a+b*c': {problem!r}")
    nums, ops = [int(p) for p in parts[0::2]], parts[1::2]
    if any(o not in "+-*" for o in ops) or any(not p.isdigit() for p in parts[0::2]):
        raise ValueError(f"not an arithmetic problem of the form 'a+b*c': {problem!r}")
    return nums, ops


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def _steps(nums: list[int], ops: list[str], *, precedence: bool = True,
           perturb: tuple[int, int] | None = None) -> list[tuple[int, str, int, int]]:
    """(a, op, b, result) steps of the evaluation; `perturb=(step, delta)` adds delta to one step's result."""
    nums, ops = list(nums), list(ops)
    steps: list[tuple[int, str, int, int]] = []

    def reduce_at(j: int) -> None:
        c = _apply(nums[j], ops[j], nums[j + 1])
        if perturb is not None and perturb[0] == len(steps):
            c += perturb[1]
        steps.append((nums[j], ops[j], nums[j + 1], c))
        nums[j:j + 2] = [c]
        del ops[j]

    if precedence:
        while "*" in ops:
            reduce_at(ops.index("*"))
    while ops:
        reduce_at(0)
    return steps


def _format(steps: list[tuple[int, str, int, int]]) -> str:
    body = ",".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)
    return f"{body} \\boxed{{{steps[-1][3]}}}"


@dataclass(frozen=True)
class ArithmeticTask:
    """Multi-step integer expressions with worked solutions ending in `\\boxed{}` (the demo task)."""

    min_operands: int = 2
    max_operands: int = 3
    max_number: int = 9
    ops: str = "+-*"

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"operands: need 2 <= min_operands ({self.min_operands}) <= max_operands ({self.max_operands})")
        if self.max_number < 1:
            raise ValueError(f"max_number={self.max_number}: must be >= 1")
        if not self.ops or set(self.ops) - set("+-*") or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r}: must be distinct characters from '+-*'")

    @staticmethod
    def split_of(problem: str) -> str:
        """'train' or 'heldout': a fixed hash of the text, so the splits never share a problem."""
        h = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "little")
        return "heldout" if h % 1000 < _HELDOUT_PER_MILLE else "train"

    @staticmethod
    def evaluate(problem: str) -> int:
        """The exact value with `*` before `+`/`-`."""
        return _steps(*_tokens(problem))[-1][3]

    def _random_problems(self, rng: np.random.Generator, chunk: int = 1024):
        """Endless stream of random problem texts (drawn in vectorised chunks)."""
        ops = np.array(list(self.ops))
        while True:
            ks = rng.integers(self.min_operands, self.max_operands + 1, size=chunk)
            nums = rng.integers(1, self.max_number + 1, size=(chunk, self.max_operands))
            opss = ops[rng.integers(len(ops), size=(chunk, self.max_operands - 1))]
            for k, ns, os_ in zip(ks, nums.tolist(), opss.tolist()):
                yield str(ns[0]) + "".join(f"{o}{n}" for o, n in zip(os_[:k - 1], ns[1:k]))

    def make_problems(self, n: int, seed: int, split: str = "train") -> list[Record]:
        """n distinct problems of `split`, deterministic in (task, seed, split)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}: must be 'train' or 'heldout'")
        if n < 0:
            raise ValueError(f"n={n}: must be >= 0")
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        seen: set[str] = set()
        out: list[Record] = []
        budget = 100 * n + 10_000
        for text in self._random_problems(rng):
            if len(out) >= n:
                break
            budget -= 1
            if budget < 0:
                raise ValueError(
                    f"ArithmeticTask: found only {len(out)} distinct {split} problems, {n} requested; "
                    "raise max_number or max_operands, or ask for fewer problems"
                )
            if text in seen or self.split_of(text) != split:
                continue
            seen.add(text)
            out.append(Record(f"arith-{split}-{seed}-{len(out)}", text, str(self.evaluate(text)),
                              {"operands": text.count("+") + text.count("-") + text.count("*") + 1}))
        return out

    @staticmethod
    def worked_solution(problem: str) -> str:
        """Step-by-step evaluation respecting precedence, ending in `\\boxed{value}`."""
        return _format(_steps(*_tokens(problem)))

    @staticmethod
    def noisy_solution(problem: str, rng: np.random.Generator, error_rate: float) -> str:
        """A worked solution that, with probability `error_rate`, makes one mistake and boxes its wrong result."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate={error_rate}: must be in [0, 1]")
        nums, ops = _tokens(problem)
        if rng.random() >= error_rate:
            return _format(_steps(nums, ops))
        truth = _steps(nums, ops)[-1][3]
        if rng.random() < 0.5:
            ltr = _steps(nums, ops, precedence=False)
            if ltr[-1][3] != truth:
                return _format(ltr)
        # Off by +-1 or +-2 in one step. Every later step is a sum, difference or
        # product with a positive factor, so the error reaches the boxed answer.
        step = int(rng.integers(len(ops)))
        delta = int(rng.choice([-2, -1, 1, 2]))
        return _format(_steps(nums, ops, perturb=(step, delta)))
