"""`entrl semantic-entropy`: dataset annotation with a policy, resumable, with a histogram."""

import json

import numpy as np
import pytest

from entrl import config as C
from entrl import sampling
from entrl.rl.setup import annotate_dataset
from entrl.semantic_entropy import SE_COLUMNS


@pytest.fixture()
def small_dataset(tmp_path):
    rows = [{"id": f"p{i}", "problem": f"{i % 7}+{i % 5}", "answer": str(i % 7 + i % 5)} for i in range(6)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _overrides():
    return ["model.path=demo", "model.tokenizer=char", "model.demo_layers=1", "model.demo_hidden=32",
            "model.demo_heads=2", "data.task=math", "data.prompt_suffix=", "data.max_prompt_len=8",
            "rollout.prompt_buckets=[8]", "rollout.max_new_tokens=6", "curriculum.samples=4", "reward.workers=1",
            "train.prompts_per_step=8", "train.minibatch_prompts=8", "train.microbatch_per_shard=8"]


def _cfg():
    return C.load_config(None, _overrides())


def test_annotate_writes_columns_histogram_and_resumes(small_dataset, tmp_path, monkeypatch):
    path, rows = small_dataset
    out = tmp_path / "annotated.jsonl"
    assert annotate_dataset(_cfg(), data=str(path), out=str(out)) == len(rows)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    for g in got:
        assert set(SE_COLUMNS) <= set(g)
        assert sum(g["class_sizes"]) == 4 and len(g["class_sizes"]) == g["n_classes"]
        p = np.array(g["class_sizes"]) / 4  # classes are never empty; the SE of the written classes, recomputed: -sum p ln p
        assert g["se"] == pytest.approx(-(p * np.log(p)).sum()) and g["se_norm"] == pytest.approx(g["se"] / np.log(4))
        assert g["pass_rate"] * 4 == round(g["pass_rate"] * 4)  # correct samples out of 4
    assert (tmp_path / "annotated.jsonl.se_hist.png").stat().st_size > 0

    # Interrupted run: the progress file lost its last two prompts. Only those are sampled again.
    progress = tmp_path / "annotated.jsonl.progress.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:-2]) + "\n")
    calls = _count_sampling(monkeypatch)
    annotate_dataset(_cfg(), data=str(path), out=str(out))
    assert calls == [2]
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again == got  # same samples for the same prompts (keyed by prompt position)

    # Finished: nothing is sampled at all.
    calls.clear()
    annotate_dataset(_cfg(), data=str(path), out=str(out))
    assert calls == []


def test_annotate_rejects_unknown_output_format(small_dataset, tmp_path):
    path, _ = small_dataset
    with pytest.raises(C.ConfigError, match="jsonl or .parquet"):  # one line from the CLI, not a traceback
        annotate_dataset(_cfg(), data=str(path), out=str(tmp_path / "x.csv"))


def test_annotate_reads_and_writes_a_bucket(small_dataset, tmp_path, fake_gcs, monkeypatch):
    """gs:// data, progress file and outputs (in-memory fake of GCS, tests/fake_gcs.py): the same rows as a
    local run, and an interrupted run resumes from the progress object."""
    from etils import epath

    path, rows = small_dataset
    local = tmp_path / "local.jsonl"
    annotate_dataset(_cfg(), data=str(path), out=str(local))
    epath.Path("gs://bucket/data.jsonl").write_text(path.read_text())
    out = "gs://bucket/se/annotated.jsonl"
    annotate_dataset(_cfg(), data="gs://bucket/data.jsonl", out=out)
    assert epath.Path(out).read_text() == local.read_text()
    assert epath.Path(out + ".se_hist.png").read_bytes()[:4] == b"\x89PNG"

    progress = epath.Path(out + ".progress.jsonl")
    progress.write_text("".join(line + "\n" for line in progress.read_text().splitlines()[:-2]))
    calls = _count_sampling(monkeypatch)
    annotate_dataset(_cfg(), data="gs://bucket/data.jsonl", out=out)
    assert calls == [2] and epath.Path(out).read_text() == local.read_text()


def _count_sampling(monkeypatch):
    calls = []
    real = sampling.Sampler.sample

    def counting(self, model, ids, mask, rng):
        calls.append(ids.shape[0])
        return real(self, model, ids, mask, rng)

    monkeypatch.setattr(sampling.Sampler, "sample", counting)
    return calls


@pytest.mark.parametrize("change", ["n", "model", "dataset", "temperature", "no_resume", "legacy_file"])
def test_stale_progress_is_never_reused(small_dataset, tmp_path, monkeypatch, caplog, change):
    """Same prompt ids, other settings: everything is sampled again, the old progress is kept aside."""
    import logging

    path, rows = small_dataset
    out = tmp_path / "annotated.jsonl"
    progress = tmp_path / "annotated.jsonl.progress.jsonl"
    annotate_dataset(_cfg(), data=str(path), out=str(out))
    provenance = json.loads((tmp_path / "annotated.jsonl.provenance.json").read_text())["provenance"]
    assert provenance["n"] == 4 and provenance["dataset"] and provenance["model"]["params"]

    cfg, kwargs = _cfg(), {}
    if change == "n":
        kwargs["n"] = 2
    elif change == "model":  # another init of the same architecture: only the weights differ
        cfg = C.load_config(None, [*_overrides(), "train.seed=1"])
    elif change == "dataset":  # same ids, other problems and answers
        path.write_text("".join(json.dumps({**r, "problem": r["problem"] + "+1"}) + "\n" for r in rows))
    elif change == "temperature":
        cfg = C.load_config(None, [*_overrides(), "rollout.temperature=0.5"])
    elif change == "no_resume":
        kwargs["resume"] = False
    else:  # a progress file from before provenance was recorded: rows only
        lines = progress.read_text().splitlines()
        progress.write_text("\n".join(lines[1:]) + "\n")
    calls = _count_sampling(monkeypatch)
    with caplog.at_level(logging.INFO, logger="entrl.semantic_entropy"):
        annotate_dataset(cfg, data=str(path), out=str(out), **kwargs)
    # every prompt sampled again; n=2: 6 prompts x 2 rows padded to 8 prompts, whose rows split over the 8 devices
    assert sum(calls) == (8 if change == "n" else len(rows)), "every prompt must be sampled again"
    assert len(list(tmp_path.glob("annotated.jsonl.progress.jsonl.stale-*"))) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if change == "no_resume":
        assert warnings == []  # asked for: no warning
    else:
        assert len(warnings) == 1 and "recomputing" in warnings[0] and "\n" not in warnings[0]
    new = json.loads((tmp_path / "annotated.jsonl.provenance.json").read_text())["provenance"]
    if change == "n":
        assert new["n"] == 2 and all(sum(g["class_sizes"]) == 2 for g in map(json.loads, out.read_text().splitlines()))
    assert (new == provenance) == (change in ("no_resume", "legacy_file"))
    # The fresh progress file resumes like any other.
    calls.clear()
    annotate_dataset(cfg, data=str(path), out=str(out), **{k: v for k, v in kwargs.items() if k != "resume"})
    assert calls == []


def test_a_tokenizer_past_the_models_embedding_is_refused_before_sampling(small_dataset, tmp_path):
    """`entrl semantic-entropy` checks the tokenizer against the model as `entrl train` does: the char
    tokenizer's ids past a 10-token embedding table would be clamped by XLA, silently."""
    from entrl.models import ModelConfig, create_model, save_pretrained

    small = ModelConfig(arch="qwen2", vocab_size=10, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True, max_position_embeddings=64)
    save_pretrained(create_model(small, seed=0), tmp_path / "small_model")
    path, _ = small_dataset
    cfg = C.replace(_cfg(), **{"model.path": str(tmp_path / "small_model")})
    with pytest.raises(C.ConfigError, match="tokenizer.*char.*tokens, the model.*embeds 10"):
        annotate_dataset(cfg, data=str(path), out=str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl.progress.jsonl").exists()
