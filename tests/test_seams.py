"""entrl.seams: the built-in rollout backend, task and reward satisfy their Protocols, and test doubles of
each plug into the code that calls them (the evaluation here; the trainer in tests/test_trainer.py).

The doubles are deterministic and need no model: a scripted rollout backend returns fixed responses, an
exact-match reward grades them, so the evaluation's numbers are known by hand.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from entrl import config as C
from entrl.evaluation import evaluate_prompts
from entrl.rewards import RewardResult, Verifier
from entrl.rl.setup import ConfiguredTask
from entrl.sampling import FINISH_LENGTH, FINISH_STOP, Rollout, Sampler, SamplingConfig
from entrl.seams import Reward, RolloutBackend, Task
from entrl.tokenizer import CharTokenizer


class ScriptedRollout:
    """A rollout backend that answers prompt b's j-th sample with `script[b][j]` (no model)."""

    def __init__(self, script, tokenizer, *, max_new_tokens=8, seq_logprobs=None):
        self.script, self.tok, self.mesh = script, tokenizer, None
        self.seq_logprobs = seq_logprobs  # [prompt][sample] log-probability of the whole response, or None (0)
        self.config = SamplingConfig.for_tokenizer(tokenizer, n=len(script[0]), max_new_tokens=max_new_tokens)
        self.calls = 0

    def sample(self, model, prompt_ids_BxP, prompt_mask_BxP, rng):
        n, L, eos = self.config.n, self.config.max_new_tokens, self.tok.eos_token_id
        first = self.calls  # prompts of this call: the next ones of the script (batches are consecutive)
        B = prompt_ids_BxP.shape[0]
        self.calls += B
        toks = np.full((B * n, L), self.config.pad_id, np.int32)
        mask = np.zeros((B * n, L), np.int32)
        finish = np.full(B * n, FINISH_LENGTH, np.int32)
        logp = np.zeros((B * n, L), np.float32)
        for b in range(B):
            prompt = min(first + b, len(self.script) - 1)
            for j, text in enumerate(self.script[prompt]):
                ids = (self.tok.encode(text) + [eos])[:L]
                r = b * n + j
                toks[r, :len(ids)], mask[r, :len(ids)] = ids, 1
                if self.seq_logprobs is not None:  # spread evenly over the response's tokens
                    logp[r, :len(ids)] = self.seq_logprobs[prompt][j] / len(ids)
                finish[r] = FINISH_STOP if ids[-1] == eos else FINISH_LENGTH
        rep = lambda x: jnp.asarray(np.repeat(np.asarray(x), n, axis=0))
        return Rollout(tokens=jnp.asarray(toks), mask=jnp.asarray(mask), logprobs=jnp.asarray(logp),
                       lengths=jnp.asarray(mask.sum(1)), finish_code=jnp.asarray(finish),
                       prompt_index=jnp.arange(B * n) // n, prompt_ids=rep(prompt_ids_BxP),
                       prompt_mask=rep(prompt_mask_BxP))


class ExactReward:
    """Correct iff the response (before any space) equals the reference; answers are equal iff identical."""

    def score(self, responses, references):
        answers = [r.split(" ")[0] or None for r in responses]
        correct = np.array([a == ref for a, ref in zip(answers, references)])
        status = ["correct" if c else "incorrect" for c in correct]
        return RewardResult(correct.astype(np.float32), correct, answers, status,
                            {"correct": int(correct.sum()), "incorrect": int((~correct).sum()), "total": len(correct)})

    def equivalent_pairs(self, pairs):
        return [a == b for a, b in pairs]

    def close(self):
        pass


def test_built_ins_and_doubles_satisfy_the_protocols():
    tok = CharTokenizer()
    assert isinstance(Sampler(SamplingConfig()), RolloutBackend)
    verifier = Verifier(workers=None)
    assert isinstance(verifier, Reward)
    verifier.close()
    task = ConfiguredTask(C.load_config("demo"))
    assert isinstance(task, Task) and task.instruction == ""  # the arithmetic task adds no instruction
    math = ConfiguredTask(C.load_config(None, ["data.task=math"]))
    assert math.instruction == C.DataSection().prompt_suffix
    assert isinstance(ScriptedRollout([["1"]], tok), RolloutBackend) and isinstance(ExactReward(), Reward)
    assert not isinstance(object(), RolloutBackend) and not isinstance(object(), Reward)


def test_evaluation_runs_on_any_rollout_backend_and_reward():
    """3 problems x 2 samples, in batches of 2 prompts (the last padded): correct samples 2, 1, 0."""
    tok = CharTokenizer()
    script = [["7", "7"], ["5", "6 x"], ["1", "2"]]
    backend = ScriptedRollout(script, tok)
    prompts = [tok.encode("3+4="), tok.encode("2+3="), tok.encode("9-1=")]
    res = evaluate_prompts(backend, None, None, tok, prompts, ["7", "5", "8"], verifier=ExactReward(), n=2,
                           ks=(1, 2), batch_prompts=2, buckets=(8,))
    np.testing.assert_array_equal(res["correct"], [[True, True], [True, False], [False, False]])
    assert res["pass@1"] == 0.5 and res["pass@2"] == pytest.approx(2 / 3)
    assert res["responses"][1] == ["5", "6 x"] and res["answers"][1] == ["5", "6"]
    assert res["response_length"] == np.mean([2, 2, 2, 4, 2, 2]) and res["truncation_rate"] == 0.0
    assert backend.calls == 4  # two calls of 2 prompts: the padding copy of the last batch is sampled, then dropped


def test_annotation_runs_on_any_rollout_backend_and_reward(tmp_path):
    """The SE annotation of 2 prompts from 4 scripted samples each: classes {7: 3, 8: 1} and {5, 6, 7, 9}."""
    import math

    from entrl.annotate import annotate_prompts
    from entrl.data.sources import Record

    tok = CharTokenizer()
    backend = ScriptedRollout([["7", "7", "8", "7"], ["5", "6", "7", "9"]], tok)
    records = [Record(id="a", problem="3+4", answer="7"), Record(id="b", problem="2+3", answer="5")]
    stats = annotate_prompts(C.load_config("demo"), None, {"w": np.zeros(2, np.float32)}, tok,
                             [tok.encode("3+4="), tok.encode("2+3=")], records, verifier=ExactReward(),
                             out_path=tmp_path / "progress.jsonl", n=4, sampler=backend)
    p = np.array([0.75, 0.25])
    assert stats[0]["class_sizes"] == [3, 1] and stats[0]["se"] == pytest.approx(-(p * np.log(p)).sum())
    assert stats[0]["pass_rate"] == 0.75
    assert stats[1]["n_classes"] == 4 and stats[1]["se"] == pytest.approx(math.log(4)) and stats[1]["pass_rate"] == 0.25


def test_annotation_options_shared_no_answer_and_likelihood_weighting(tmp_path):
    """curriculum.se_no_answer=shared puts the two answerless samples ("" -> None) in one class;
    se_weighting=likelihood weighs the classes by their samples' sequence probabilities (here
    log-probs ln 0.4, ln 0.2, ln 0.1, ln 0.1 for answers 7, 7, none, none: classes 0.6 / 0.2, normalised
    to 0.75 / 0.25), and likelihood_per_token by per-token geometric means. The options are part of the
    progress file's provenance: another setting recomputes."""
    from entrl.annotate import annotate_prompts, read_progress
    from entrl.data.sources import Record

    tok = CharTokenizer()
    script, lps = [["7", "7", " ", " "]], [[np.log(0.4), np.log(0.2), np.log(0.1), np.log(0.1)]]
    records, prompts = [Record(id="a", problem="3+4", answer="7")], [tok.encode("3+4=")]
    progress = tmp_path / "progress.jsonl"

    def annotate(*overrides):
        cfg = C.load_config("demo", list(overrides))
        return annotate_prompts(cfg, None, {"w": np.zeros(2, np.float32)}, tok, prompts, records,
                                verifier=ExactReward(), out_path=progress, n=4,
                                sampler=ScriptedRollout(script, tok, seq_logprobs=lps))[0]

    def entropy(p):
        p = np.asarray(p) / np.sum(p)
        return float(-(p * np.log(p)).sum())

    assert annotate()["se"] == pytest.approx(entropy([2, 1, 1]))  # default: each answerless sample its own class
    shared = annotate("curriculum.se_no_answer=shared")
    assert shared["class_sizes"] == [2, 2] and shared["se"] == pytest.approx(np.log(2))
    assert read_progress(progress)[0]["se"] == {"no_answer": "shared", "weighting": "count"}
    weighted = annotate("curriculum.se_no_answer=shared", "curriculum.se_weighting=likelihood")
    assert weighted["se"] == pytest.approx(entropy([0.6, 0.2]))
    # per token: "7" + EOS is 2 tokens, " " + EOS too: the geometric means are the square roots
    per_token = annotate("curriculum.se_no_answer=shared", "curriculum.se_weighting=likelihood_per_token")
    assert per_token["se"] == pytest.approx(entropy([0.4 ** 0.5 + 0.2 ** 0.5, 2 * 0.1 ** 0.5]), rel=1e-5)
    assert len(list(tmp_path.glob("progress.jsonl.stale-*"))) == 3  # earlier settings' files kept aside
