"""The semantic-entropy curriculum (docs/method.md, "The curriculum"): which prompts, in which order,
per stage and epoch.

Design decisions:
- Prompts are sorted ascending by semantic entropy (low SE = the model is
  consistent = easy first). Ties are broken by a seeded random permutation, so
  equal-SE prompts (very common: SE is 0 for every prompt the model always
  answers the same way) do not stay in file order.
- `order` exists for the paper's ordering ablation: "low_to_high" (SENT),
  "high_to_low" (the same stages visited hardest first: descending SE, so
  the first stage holds the highest-SE prompts), "random" (the same number
  and sizes of stages over a seeded random permutation; SE is ignored).
- Stages are equal-count quantiles of that order (`np.array_split`: sizes
  differ by at most one), or, when `thresholds` are given, SE intervals
  `[-inf, t1), [t1, t2), ..., [tk, inf)` (a prompt exactly at a threshold goes
  to the higher stage). An empty stage is an error: it would train nothing.
- `mode="staged"`: each stage is trained for `epochs_per_stage` epochs; each
  epoch visits the stage in a seeded shuffle drawn from (seed, stage, epoch),
  so the order differs between epochs and seeds and is reproducible.
  `mode="continuous"`: one stage holding every prompt in ascending SE order,
  not shuffled, and the same low-to-high pass is repeated `epochs_per_stage`
  times (stages and thresholds are ignored).
- `drop_trivial` removes prompts whose SE samples were all correct or all
  wrong (pass_rate 0 or 1): every GRPO group for them would have zero
  advantage. The count is kept in `dropped_trivial`.
- `Curriculum.uniform(n, epochs, seed)` is the no-curriculum baseline: one
  stage with all prompts, reshuffled every epoch.
- Indices always refer to the caller's record list; dropped prompts simply
  never appear.
- `refreshed(se)` is the same curriculum over new SE values (online refresh from
  the training rollouts, `entrl.data.pipeline`): the same prompts (the trivial
  ones were dropped on the annotation's pass rates), the same equal-count stage
  sizes, re-ranked. Not defined for thresholds (stage sizes would change
  mid-run) nor for order="random" (SE unused).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

# Stream tags so the tie-break and the per-epoch shuffles never share a random stream.
_TIE_BREAK, _EPOCH = 0, 1
ORDERS = ("low_to_high", "high_to_low", "random")


class Curriculum:
    """Stages of prompt indices in ascending-SE order, and the per-epoch visiting order of each."""

    def __init__(
        self,
        se: np.ndarray | Sequence[float],
        *,
        stages: int = 2,
        thresholds: Sequence[float] = (),
        epochs_per_stage: int = 5,
        mode: str = "staged",
        order: str = "low_to_high",
        seed: int = 0,
        pass_rate: np.ndarray | Sequence[float] | None = None,
        drop_trivial: bool = False,
    ):
        se = np.asarray(se, dtype=np.float64)
        if se.ndim != 1 or se.size == 0:
            raise ValueError(f"se must be a non-empty 1-D array, got shape {se.shape}")
        bad = np.flatnonzero(~np.isfinite(se))
        if bad.size:
            raise ValueError(f"semantic entropy of row {bad[0]} is {se[bad[0]]} ({bad.size} non-finite values); "
                             "re-run the semantic-entropy annotation for those rows")
        if mode not in ("staged", "continuous"):
            raise ValueError(f"mode={mode!r}: must be 'staged' or 'continuous'")
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: must be one of {', '.join(ORDERS)}")
        if stages < 1 or epochs_per_stage < 1:
            raise ValueError(f"stages={stages}, epochs_per_stage={epochs_per_stage}: both must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        thresholds = [float(t) for t in thresholds]
        if thresholds != sorted(thresholds):
            raise ValueError(f"thresholds={thresholds}: must be ascending")
        self._args = dict(stages=stages, thresholds=tuple(thresholds), epochs_per_stage=epochs_per_stage, mode=mode,
                          order=order, seed=seed, pass_rate=pass_rate, drop_trivial=drop_trivial)
        self.mode = mode
        self.order = order
        self.seed = int(seed)
        self.epochs_per_stage = int(epochs_per_stage)
        self.se = se

        keep = np.ones(se.size, dtype=bool)
        if drop_trivial:
            if pass_rate is None:
                raise ValueError("drop_trivial=True needs pass_rate (from the semantic-entropy annotation)")
            pr = np.asarray(pass_rate, dtype=np.float64)
            if pr.shape != se.shape:
                raise ValueError(f"pass_rate has shape {pr.shape}, se has {se.shape}")
            keep = ~(np.isclose(pr, 0.0) | np.isclose(pr, 1.0))
        self.dropped_trivial = int(se.size - keep.sum())
        if not keep.any():
            raise ValueError(f"drop_trivial removed all {se.size} prompts (every pass_rate is 0 or 1)")
        if self.dropped_trivial:
            log.info("curriculum: dropped %d of %d prompts with pass_rate 0 or 1", self.dropped_trivial, se.size)

        # Ascending SE, seeded tie-break: permute, then stable-sort the permuted values ("random": the
        # permutation itself; "high_to_low": descending SE, ties in the same seeded order).
        candidates = np.flatnonzero(keep)
        perm = np.random.default_rng([self.seed, _TIE_BREAK]).permutation(candidates)
        key = {"low_to_high": se[perm], "high_to_low": -se[perm], "random": np.zeros(perm.size)}[order]
        order = perm[np.argsort(key, kind="stable")]

        if mode == "continuous":
            self._stages = [order]
        elif thresholds and self.order == "random":
            raise ValueError("thresholds split by SE value; order='random' ignores SE: give stages instead")
        elif thresholds:
            stage_of = np.searchsorted(np.asarray(thresholds), se[order], side="right")
            self._stages = [order[stage_of == s] for s in range(len(thresholds) + 1)]
            if self.order == "high_to_low":
                self._stages = self._stages[::-1]
            for s, idx in enumerate(self._stages if self.order == "low_to_high" else self._stages[::-1]):
                if idx.size == 0:
                    lo = thresholds[s - 1] if s > 0 else -np.inf
                    hi = thresholds[s] if s < len(thresholds) else np.inf
                    raise ValueError(f"curriculum stage {s} (SE in [{lo}, {hi})) is empty; SE ranges over "
                                     f"[{se[order[0]]:.4g}, {se[order[-1]]:.4g}]: choose other thresholds")
        else:
            if stages > order.size:
                raise ValueError(f"stages={stages} > number of prompts ({order.size})")
            self._stages = list(np.array_split(order, stages))

    @property
    def refreshable(self) -> bool:
        """Whether `refreshed` is defined: SE orders the prompts and stage sizes do not depend on SE values."""
        return self.order != "random" and not self._args["thresholds"]

    def refreshed(self, se: np.ndarray | Sequence[float]) -> Curriculum:
        """The same curriculum (prompts, settings, stage sizes) ranked by new SE values."""
        if not self.refreshable:
            raise ValueError("a curriculum with SE thresholds or order='random' cannot be re-ranked")
        new = Curriculum(se, **self._args)
        if [s.size for s in new._stages] != [s.size for s in self._stages]:  # cannot happen: equal-count split
            raise AssertionError("re-ranking changed the stage sizes")
        return new

    @classmethod
    def uniform(cls, n: int, epochs: int, seed: int = 0) -> Curriculum:
        """No curriculum: one stage of all n prompts, reshuffled every epoch."""
        return cls(np.zeros(n), stages=1, epochs_per_stage=epochs, mode="staged", seed=seed)

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    @property
    def num_prompts(self) -> int:
        return int(sum(s.size for s in self._stages))

    def stage_indices(self, stage: int) -> np.ndarray:
        """Record indices of `stage` in ascending SE order (a copy)."""
        self._check_stage(stage)
        return self._stages[stage].copy()

    def epoch_order(self, stage: int, epoch: int) -> np.ndarray:
        """Visiting order of `stage` in `epoch`: a seeded shuffle (staged) or ascending SE (continuous)."""
        self._check_stage(stage)
        if not 0 <= epoch < self.epochs_per_stage:
            raise ValueError(f"epoch {epoch} out of range [0, {self.epochs_per_stage})")
        idx = self._stages[stage]
        if self.mode == "continuous":
            return idx.copy()
        return np.random.default_rng([self.seed, _EPOCH, stage, epoch]).permutation(idx)

    def schedule(self) -> list[tuple[int, int]]:
        """(stage, epoch) pairs in training order."""
        return [(s, e) for s in range(self.num_stages) for e in range(self.epochs_per_stage)]

    def summary(self) -> list[dict]:
        """Per stage: size and SE range (for logs)."""
        return [{"stage": s, "size": int(idx.size), "se_min": float(self.se[idx].min()),
                 "se_max": float(self.se[idx].max())} for s, idx in enumerate(self._stages)]

    def fingerprint(self) -> str:
        """Hash of everything that determines the visiting order (stages, mode, seed, epochs)."""
        h = hashlib.sha256(f"{self.mode}|{self.seed}|{self.epochs_per_stage}|".encode())
        for idx in self._stages:
            h.update(np.asarray(idx, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range [0, {self.num_stages})")

    def __repr__(self) -> str:
        sizes = [int(s.size) for s in self._stages]
        return (f"Curriculum(mode={self.mode!r}, order={self.order!r}, stages={sizes}, epochs_per_stage={self.epochs_per_stage}, "
                f"seed={self.seed}, dropped_trivial={self.dropped_trivial})")
