"""Test doubles shared by several test modules."""

import zlib

import numpy as np

from entrl.rewards import RewardResult


class ParityVerifier:
    """Reward 1 when crc32(response) is even: deterministic, about half right (mixed groups from a random
    policy), no worker processes."""

    def score(self, responses, references):
        assert len(responses) == len(references)
        correct = np.array([zlib.crc32(r.encode()) % 2 == 0 for r in responses])
        status = ["correct" if c else "incorrect" for c in correct]
        counts = {"correct": int(correct.sum()), "incorrect": int((~correct).sum()), "total": len(correct)}
        return RewardResult(correct.astype(np.float32), correct, [r[-1:] or None for r in responses], status, counts)

    def score_rewards(self, responses, references, records):  # the trainer's call (no reward.fn terms here)
        return self.score(responses, references)

    def equivalent_pairs(self, pairs):
        return [a == b for a, b in pairs]

    def close(self):
        pass
