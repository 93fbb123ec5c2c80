"""Reaching the Hugging Face Hub, or failing fast when it cannot be reached.

Offline (a TPU VM without egress, a CI box, a laptop on a plane), `datasets.load_dataset` and
`huggingface_hub.snapshot_download` retry a failed name lookup five times with back-off: about 25 s of
silence before their error. `unreachable()` asks once per process, by opening a connection to the Hub's
endpoint (a few ms online, immediate without DNS, 5 s at most behind a silent firewall); the callers then
read only the local caches and, when those lack the name, fail in one line at once.

No check is made (the libraries decide, as before) when the user set `HF_HUB_OFFLINE` (the libraries read
their caches without the network), or when a proxy is configured (a direct connection failing proves
nothing then).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "ON", "YES", "TRUE")
CONNECT_TIMEOUT_S = 5.0


def _offline_mode_set() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                "TRANSFORMERS_OFFLINE"))


@functools.cache
def unreachable() -> str:
    """Why the Hub cannot be reached from this machine ("" when it can, or when no check applies)."""
    if _offline_mode_set() or any(os.environ.get(v) for v in _PROXY_VARS):
        return ""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror or e}"
    except OSError as e:  # refused, unreachable network, timed out
        return f"cannot connect to {host}:{port}: {e.strerror or e or type(e).__name__}"
    return ""


def offline_error(name: str, kind: str) -> str:
    """The one-line reason a hub `name` (a `kind`: "model" or "dataset") cannot be had here."""
    hint = "; set HF_HUB_OFFLINE=1 to read a cached copy the check missed" if kind == "dataset" else ""
    return (f"the Hugging Face Hub is unreachable from this machine ({unreachable()}), and no cached copy of "
            f"{kind} {name!r} was found{hint}")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def dataset_maybe_cached(name: str) -> bool:
    """Whether `datasets` may hold `name` ("namespace/name") in its caches (its own Arrow cache, or the
    Hub's file cache). Loose on purpose: a false yes costs only the libraries' retries before their own
    cache fallback; a false no is an error that says how to read the cache anyway."""
    import datasets  # noqa: PLC0415 (only reached on the hub path, which imports it anyway)
    from huggingface_hub import constants  # noqa: PLC0415

    want = _key(name)
    roots = [(Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))), ""),
             (Path(os.path.expanduser(str(constants.HF_HUB_CACHE))), "datasets")]
    for root, prefix in roots:
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            key = _key(entry.name)
            if entry.is_dir() and key.startswith(prefix) and key[len(prefix):] == want:
                return True
    return False


def load_dataset(name: str, split: str):
    """`datasets.load_dataset(name, split=split)`, failing at once (ConnectionError) when the Hub is unreachable
    and no cached copy can exist."""
    import datasets  # noqa: PLC0415 (seconds to import; local files do not need it)

    if unreachable() and not dataset_maybe_cached(name):
        raise ConnectionError(offline_error(name, "dataset"))
    return datasets.load_dataset(name, split=split)
