"""The three places a new part plugs in: a rollout backend, a task, a reward. Each is a small Protocol
naming exactly what entrl calls on it.

Design decisions:
- Protocols, not base classes: an implementation needs no entrl import to qualify, and the built-in
  ones (`entrl.sampling.Sampler`, `entrl.rl.setup.ConfiguredTask`, `entrl.rewards.Verifier`) are
  checked against them in tests/test_seams.py, next to the test doubles that stand in for each in
  the tests of the trainer, the evaluation and the annotation.
- What the caller passes and gets back is spelled out in the method docstrings (shapes included);
  the array types are entrl's own (`SamplingConfig`, `Rollout`, `RewardResult`, `Record`), imported
  for type checkers only, so this module imports nothing at run time.
- Left out on purpose: a registry of named backends / tasks / rewards in the config. A new one is
  passed in code (`setup(cfg, task=..., verifier=...)`, `Trainer(components)`); it earns a config name
  once there is a second built-in one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # types only: this module stays import-free at run time
    from entrl.data.sources import Record
    from entrl.rewards import RewardResult
    from entrl.sampling import Rollout, SamplingConfig


@runtime_checkable
class RolloutBackend(Protocol):
    """Samples n responses per prompt: what the trainer's rollout, the evaluation and the SE annotation call.

    Built in: `entrl.sampling.Sampler` (jitted KV-cache decoding, optionally with continuous batching).
    """

    config: SamplingConfig  # static settings; callers read n, pad_id and logprob_temperature
    mesh: Any  # the jax Mesh the rows are split over, or None (one device)

    def sample(self, model: Any, prompt_ids_BxP: Any, prompt_mask_BxP: Any, rng: Any) -> Rollout:
        """`model` = (graphdef, params); prompts left-padded with `config.pad_id` ([B, P] int32 ids and 0/1
        mask); returns a `Rollout` of R = B * n rows, rows of one prompt contiguous, every array of fixed
        shape [R, config.max_new_tokens] (or [R])."""
        ...


@runtime_checkable
class Reward(Protocol):
    """Grades responses against reference answers: the RL reward, the evaluation's correctness, and the
    answer equivalence that clusters answers for semantic entropy.

    Built in: `entrl.rewards.Verifier` (answer extraction + math-verify in worker processes).
    """

    def score(self, responses: Sequence[str], references: Sequence[str]) -> RewardResult:
        """One `RewardResult` for the batch: rewards, correct, extracted answers, status and counts."""
        ...

    def equivalent_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each (answer, answer) pair means the same (symmetric)."""
        ...

    def close(self) -> None:
        """Release what the reward holds (worker processes); called once when the run ends."""
        ...


@runtime_checkable
class Task(Protocol):
    """Where the prompts and their reference answers come from, and how a response is rewarded.

    Built in: `entrl.rl.setup.ConfiguredTask` (`data.task`: a dataset of math problems, or the demo's
    synthetic arithmetic), graded by the `Verifier`.
    """

    instruction: str  # appended to each plain-text problem ("" = the problem as is; never to chat prompts)

    def records(self) -> tuple[Sequence[Record], Sequence[Record] | None]:
        """(training records, held-out records or None): each a `Record` with id, problem and answer."""
        ...

    def reward(self) -> Reward:
        """The reward that grades this task's responses (the caller closes it)."""
        ...
