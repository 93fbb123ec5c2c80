"""Fixed-shape prompt batches in curriculum order, sharded across processes, with resumable state.

Design decisions:
- The pipeline is a stateful iterator (like a grain DatasetIterator):
  `iter(pipeline)` is the pipeline itself, `get_state()` / `set_state()` save
  and restore its position as a small JSON-serialisable dict (it goes into the
  training checkpoint). It walks the curriculum's schedule, stage by stage and
  epoch by epoch; each (stage, epoch) is a `grain.MapDataset` over that epoch's
  order, batched and collated, iterated with grain's own iterator whose state
  is stored alongside.
- One global step consumes a contiguous chunk of `G = batch_size *
  process_count` prompts of the epoch order; process p takes the contiguous
  slice `chunk[p*batch_size:(p+1)*batch_size]`, so the global batch assembled
  in process order equals a single-process run's batch row for row. So in an epoch the processes' batches are
  disjoint and together cover the used part of the stage, and step k's
  prompts do not depend on how G is split across processes: a state saved
  with 4 processes x 8 prompts restores under 2 x 16. The state is checked
  against a fingerprint (curriculum order, prompt count, G, drop_remainder).
- Shapes: every batch is `[batch_size, P]`, left-padded with `pad_id`, where P
  is the smallest bucket that fits the longest prompt of the global chunk
  (not just this process's rows), so all processes agree on the shape of each
  step. Prompts longer than the largest bucket, or empty, are rejected at
  construction; `tokenize_prompts` drops long ones earlier.
- Remainders: with `drop_remainder=True` (default) an epoch has
  `floor(n_stage / G)` steps and the last `n_stage mod G` prompts of that
  epoch's shuffle are skipped; the next epoch reshuffles, so different
  prompts are skipped each time (in "continuous" mode the order is not
  shuffled, so the same highest-SE tail is skipped each epoch; the count is
  logged at construction and available as `dropped_per_epoch`). With
  `drop_remainder=False` the last step is completed by wrapping around to the
  start of the epoch order; the repeated rows have `valid == False`.
- A stage smaller than G has no full step and is an error with
  `drop_remainder=True`.
- Online SE refresh (`refresh=True`): the trainer reports each step's per-prompt
  SE from its own rollouts (`observe_se`); at every epoch boundary after the
  first, the next epoch runs on the curriculum re-ranked by the latest SE of
  every prompt (`Curriculum.refreshed`: refreshed where the prompt was trained
  on, else the annotation's). Stage sizes, steps per epoch and the schedule do
  not change, only which prompts each stage holds and their order. The state
  carries the refreshed values (those of the running epoch's ranking and the
  latest), so a resumed run re-ranks exactly as an uninterrupted one.
- Collation is a few microseconds of numpy per batch, so there is no
  prefetching (grain's multiprocessing would only add pickling and spawn
  pitfalls); the trainer's rollout dominates every step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from entrl.data.curriculum import Curriculum

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class PromptBatch:
    """One process's share of a global step."""

    input_ids: np.ndarray  # [B, P] int32, left-padded with pad_id
    attention_mask: np.ndarray  # [B, P] int32, 1 on prompt tokens
    indices: np.ndarray  # [B] int32, row index into the record / prompt-token list
    valid: np.ndarray  # [B] bool; False only for wrap-around repeats when drop_remainder=False
    stage: int  # curriculum stage
    epoch: int  # epoch within the stage
    step_in_epoch: int  # step within the epoch, 0-based
    steps_in_epoch: int  # steps in this epoch
    step: int  # global step over the whole schedule, 0-based
    first_in_stage: bool  # first batch of its stage (the trainer may reset the optimizer here)
    last_in_stage: bool  # last batch of its stage


class PromptPipeline:
    """Iterator of `PromptBatch` over a curriculum schedule; see the module docstring."""

    def __init__(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        curriculum: Curriculum,
        *,
        batch_size: int,
        pad_id: int,
        buckets: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        refresh: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1 (it is per process)")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}: need 0 <= index < count")
        buckets = [int(b) for b in buckets]
        if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets={buckets}: must be a non-empty, strictly ascending list of positive lengths")
        if pad_id < 0:
            raise ValueError(f"pad_id={pad_id}: must be a valid token id")
        if refresh and not curriculum.refreshable:
            raise ValueError("online SE refresh re-ranks the prompts by SE into stages of fixed sizes: not with SE "
                             "thresholds or order='random'")
        if curriculum.se.size != len(prompt_tokens):
            raise ValueError(f"curriculum covers {curriculum.se.size} prompts but {len(prompt_tokens)} prompt token "
                             "lists were given; build both from the same (kept) records")
        self._tokens = [np.asarray(t, dtype=np.int32) for t in prompt_tokens]
        self._lengths = np.array([t.size for t in self._tokens], dtype=np.int64)
        self.curriculum = curriculum
        self.batch_size = int(batch_size)
        self.pad_id = int(pad_id)
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.drop_remainder = bool(drop_remainder)
        self.global_batch = self.batch_size * self.process_count

        used = np.concatenate([curriculum.stage_indices(s) for s in range(curriculum.num_stages)])
        too_long = used[self._lengths[used] > self.buckets[-1]]
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(f"prompt row {i} has {self._lengths[i]} tokens > largest bucket {self.buckets[-1]} "
                             f"({too_long.size} such prompts); drop them with tokenize_prompts(max_prompt_len=...) "
                             "or add a bigger bucket")
        empty = used[self._lengths[used] == 0]
        if empty.size:
            raise ValueError(f"prompt row {int(empty[0])} is empty ({empty.size} empty prompts)")

        self._steps: list[int] = []
        for s in range(curriculum.num_stages):
            n = curriculum.stage_indices(s).size
            steps = n // self.global_batch if self.drop_remainder else -(-n // self.global_batch)
            if steps == 0:
                raise ValueError(f"curriculum stage {s} has {n} prompts < one global batch ({self.batch_size} x "
                                 f"{self.process_count} processes); lower the batch size, use fewer stages, "
                                 "or set drop_remainder=False")
            self._steps.append(steps)
            if self.drop_remainder and n % self.global_batch:
                log.info("stage %d: %d prompts, %d steps per epoch, %d prompts skipped per epoch (reshuffled each "
                         "epoch)", s, n, steps, n % self.global_batch)
        self._schedule = curriculum.schedule()
        self._offsets = np.concatenate([[0], np.cumsum([self._steps[s] for s, _ in self._schedule])]).tolist()
        self._fingerprint = {
            "curriculum": curriculum.fingerprint(),
            "num_prompts": len(self._tokens),
            "global_batch": self.global_batch,
            "drop_remainder": self.drop_remainder,
        }
        self._pos = 0  # index into the schedule
        self._step = 0  # next step within the current epoch
        self._it: Any = None  # grain iterator of the current epoch, built lazily
        self.refresh = bool(refresh)
        self._annotated = curriculum  # the ranking of the annotation (the first epoch's)
        self._se_live: dict[int, float] = {}  # prompt row -> its latest SE from the training rollouts
        self._se_ranked: dict[int, float] = {}  # the values the running epoch's curriculum was ranked by
        self.refreshes = 0  # re-rankings so far (logged)

    # -- sizes ---------------------------------------------------------------

    def steps_per_epoch(self, stage: int) -> int:
        return self._steps[stage]

    def dropped_per_epoch(self, stage: int) -> int:
        """Prompts of `stage` skipped each epoch (0 with drop_remainder=False)."""
        n = self.curriculum.stage_indices(stage).size
        return n - self._steps[stage] * self.global_batch if self.drop_remainder else 0

    @property
    def total_steps(self) -> int:
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return self.total_steps

    # -- one epoch as a grain dataset ----------------------------------------

    def _epoch_dataset(self, pos: int) -> grain.MapDataset:
        stage, epoch = self._schedule[pos]
        steps, g, p, b = self._steps[stage], self.global_batch, self.process_index, self.batch_size
        order = self.curriculum.epoch_order(stage, epoch)
        used = order[: steps * g] if self.drop_remainder else np.resize(order, steps * g)
        valid = np.arange(steps * g) < order.size
        longest = self._lengths[used].reshape(steps, g).max(axis=1)
        widths = self.buckets[np.searchsorted(self.buckets, longest, side="left")]
        # Process p's rows of step k: the contiguous slice [p*b, (p+1)*b) of the step's chunk, so the
        # global array assembled in process order (sharding.shard_batch) is the chunk itself, identical
        # to a single-process run's batch (same rows, same row order, hence the same samples).
        local_slice = lambda x: x.reshape(steps, g)[:, p * b:(p + 1) * b].reshape(-1)
        local_valid = local_slice(valid)
        step0 = self._offsets[pos]

        def collate(k: int, rows: np.ndarray) -> PromptBatch:
            width = int(widths[k])
            ids = np.full((b, width), self.pad_id, dtype=np.int32)
            mask = np.zeros((b, width), dtype=np.int32)
            for r, i in enumerate(rows):
                t = self._tokens[i]
                ids[r, width - t.size:] = t
                mask[r, width - t.size:] = 1
            return PromptBatch(
                input_ids=ids, attention_mask=mask, indices=rows.astype(np.int32),
                valid=local_valid[k * b:(k + 1) * b].copy(), stage=stage, epoch=epoch, step_in_epoch=k,
                steps_in_epoch=steps, step=step0 + k, first_in_stage=epoch == 0 and k == 0,
                last_in_stage=epoch == self.curriculum.epochs_per_stage - 1 and k == steps - 1,
            )

        local = local_slice(used)
        return grain.MapDataset.source(local).batch(b, drop_remainder=True).map_with_index(collate)

    # -- iteration -----------------------------------------------------------

    def __iter__(self) -> PromptPipeline:
        return self

    def observe_se(self, indices: Sequence[int], values: Sequence[float]) -> None:
        """The latest SE of prompt rows `indices` (from a training step's rollouts); with `refresh`, the
        next epoch is ranked by them. Every process must report the same values."""
        if self.refresh:
            for i, v in zip(indices, values, strict=True):
                if not np.isfinite(v):
                    raise ValueError(f"SE of prompt row {i} is {v}")
                self._se_live[int(i)] = float(v)

    def _rank(self, values: dict[int, float]) -> None:
        """Run on the annotation's curriculum re-ranked by `values` (row -> SE; other rows keep theirs)."""
        se = self._annotated.se.copy()
        if values:
            rows = np.fromiter(values.keys(), dtype=np.int64, count=len(values))
            se[rows] = np.fromiter(values.values(), dtype=np.float64, count=len(values))
        self.curriculum = self._annotated.refreshed(se) if values else self._annotated
        self._se_ranked = dict(values)
        self._fingerprint["curriculum"] = self.curriculum.fingerprint()

    def __next__(self) -> PromptBatch:
        while self._pos < len(self._schedule):
            if self._it is None and self._step == 0 and self._pos > 0 and self.refresh:
                before = {s: set(self.curriculum.stage_indices(s).tolist()) for s in range(self.curriculum.num_stages)}
                self._rank(self._se_live)
                self.refreshes += 1
                moved = sum(len(before[s] - set(self.curriculum.stage_indices(s).tolist())) for s in before)
                log.info("curriculum re-ranked by the SE of %d prompts' training rollouts (%d of %d prompts changed "
                         "stage)", len(self._se_live), moved, self.curriculum.num_prompts)
            if self._it is None:
                self._it = iter(self._epoch_dataset(self._pos))
                if self._step:
                    self._it.set_state({"next_index": self._step})
            try:
                batch = next(self._it)
            except StopIteration:
                self._pos, self._step, self._it = self._pos + 1, 0, None
                continue
            self._step += 1
            return batch
        raise StopIteration

    # -- state ---------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: schedule index, stage/epoch, step within the epoch, grain state."""
        done = self._pos >= len(self._schedule)
        stage, epoch = (None, None) if done else self._schedule[self._pos]
        grain_state = self._it.get_state() if self._it is not None else {"next_index": self._step}
        return {
            "version": STATE_VERSION,
            "schedule_pos": self._pos,
            "stage": stage,
            "epoch": epoch,
            "step_in_epoch": self._step,
            "step": int(self._offsets[self._pos]) + self._step if not done else self.total_steps,
            "grain": {k: int(v) for k, v in grain_state.items()},
            "fingerprint": dict(self._fingerprint),
            # online refresh: [row, SE] pairs (JSON floats round-trip exactly)
            **({"se_ranked": sorted(self._se_ranked.items()), "se_live": sorted(self._se_live.items()),
                "refreshes": self.refreshes} if self.refresh else {}),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` (from `get_state`) was taken."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pipeline state version {state.get('version')!r}, expected {STATE_VERSION}")
        if ("se_live" in state) != self.refresh:
            raise ValueError(f"pipeline state was saved with online SE refresh {'on' if 'se_live' in state else 'off'}"
                             f"; this run has it {'on' if self.refresh else 'off'} (curriculum.refresh)")
        if self.refresh:  # the running epoch's ranking first: the fingerprint check below is of it
            self._rank({int(i): float(v) for i, v in state["se_ranked"]})
        saved = state.get("fingerprint", {})
        for key, value in self._fingerprint.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"pipeline state was saved with {key}={saved.get(key)!r} but this run has {value!r}; resume "
                    "with the same data, curriculum (seed, stages, epochs) and global batch size"
                )
        pos, step = int(state["schedule_pos"]), int(state["step_in_epoch"])
        if not 0 <= pos <= len(self._schedule):
            raise ValueError(f"pipeline state schedule_pos={pos} out of range [0, {len(self._schedule)}]")
        if pos < len(self._schedule):
            stage, epoch = self._schedule[pos]
            if (state.get("stage"), state.get("epoch")) != (stage, epoch) or not 0 <= step <= self._steps[stage]:
                raise ValueError(f"pipeline state (stage {state.get('stage')}, epoch {state.get('epoch')}, step "
                                 f"{step}) does not match this schedule")
        if int(state.get("grain", {}).get("next_index", step)) != step:
            raise ValueError(f"pipeline state: grain next_index {state['grain']} != step_in_epoch {step}")
        self._pos, self._step, self._it = pos, step, None
        if self.refresh:
            self._se_live = {int(i): float(v) for i, v in state["se_live"]}
            self.refreshes = int(state["refreshes"])
