"""Hub access offline: one check, the local caches only, a one-line error at once (not 25 s of retries)."""

import socket
import time
from pathlib import Path

import pytest

from entrl import hub
from entrl.build import resolve_model_dir
from entrl.config import ConfigError
from entrl.data.sources import load_records, names_hub_dataset

_HUB_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
            "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No offline mode or proxy set, an endpoint that refuses connections, empty caches."""
    for var in _HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.unreachable.cache_clear()
    yield tmp_path
    hub.unreachable.cache_clear()


def test_unreachable_says_why_and_defers_to_offline_mode_and_proxies(offline, monkeypatch):
    assert hub.unreachable().startswith("cannot connect to 127.0.0.1:")
    monkeypatch.setenv("HF_ENDPOINT", "https://entrl-no-such-host.invalid")
    hub.unreachable.cache_clear()
    assert hub.unreachable().startswith("cannot resolve entrl-no-such-host.invalid")
    for var, value in [("HF_HUB_OFFLINE", "1"), ("HTTPS_PROXY", "http://proxy:3128")]:
        monkeypatch.setenv(var, value)
        hub.unreachable.cache_clear()
        assert hub.unreachable() == "", var  # the libraries decide: cache only, or through the proxy
        monkeypatch.delenv(var)
    with socket.socket() as server:  # a listening endpoint is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        hub.unreachable.cache_clear()
        assert hub.unreachable() == ""


def test_offline_dataset_and_model_fail_at_once_in_one_line(offline):
    start = time.monotonic()
    with pytest.raises(ValueError) as data_err:
        load_records("someone/no-such-dataset")
    with pytest.raises(ConfigError) as model_err:
        resolve_model_dir("someone/no-such-model")
    assert time.monotonic() - start < 10  # the libraries' own retries take about 25 s each
    for err, kind in [(data_err, "dataset 'someone/no-such-dataset'"), (model_err, "model 'someone/no-such-model'")]:
        msg = str(err.value)
        assert "\n" not in msg and "unreachable from this machine (cannot connect to 127.0.0.1:" in msg, msg
        assert f"no cached copy of {kind} was found" in msg, msg
    assert "HF_HUB_OFFLINE=1" in str(data_err.value)


def test_offline_model_comes_from_the_hub_cache(offline):
    """A model downloaded before is used offline: the Hub's snapshot layout, read with local_files_only."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "hub" / "models--someone--cached-model"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model_dir("someone/cached-model") == snap


def test_dataset_cache_lookup_matches_both_cache_layouts(offline):
    assert not hub.dataset_maybe_cached("HuggingFaceH4/MATH-500")
    (offline / "datasets" / "HuggingFaceH4___m_a_t_h-500").mkdir(parents=True)  # datasets' Arrow cache name
    assert hub.dataset_maybe_cached("HuggingFaceH4/MATH-500")
    assert not hub.dataset_maybe_cached("HuggingFaceH4/aime_2024")
    (offline / "hub" / "datasets--HuggingFaceH4--aime_2024").mkdir(parents=True)  # the Hub's file cache
    assert hub.dataset_maybe_cached("HuggingFaceH4/aime_2024")
    assert not hub.dataset_maybe_cached("other/aime_2024")


@pytest.mark.parametrize(("source", "is_hub"), [
    ("HuggingFaceH4/MATH-500", True), ("open-r1/DAPO-Math-17k-Processed", True), ("gsm8k", True),
    ("data/train.jsonl", False), ("train.parquet", False), ("./train", False), ("/abs/train", False),
    ("~/train", False), ("gs://bucket/train.jsonl", False), (str(Path(__file__).parent), False),  # an existing directory
])
def test_names_hub_dataset(source, is_hub):
    assert names_hub_dataset(source) is is_hub
