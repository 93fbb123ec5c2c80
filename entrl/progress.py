"""Progress bars (tqdm, with rate and ETA) that never garble a log.

Design decisions:
- A bar is drawn only on process 0, and only when asked (`train.progress=on`) or when
  stderr is a terminal (`auto`). Otherwise nothing is drawn and the callers keep their
  one line per step or batch, which reads well in redirected logs and CI.
- While a bar is drawn, console log records go through `tqdm.write` (tqdm's
  `logging_redirect_tqdm`), like the metrics' console line (`entrl.metrics`), so the
  bar stays the last line instead of being split by them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import jax
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

SETTINGS = ("auto", "on", "off")


def wanted(setting: str) -> bool:
    """Whether `setting` (auto | on | off) draws a bar in this process."""
    if setting not in SETTINGS:
        raise ValueError(f"progress={setting!r}: must be one of {', '.join(SETTINGS)}")
    if setting == "off" or jax.process_index() != 0:
        return False
    return setting == "on" or sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(total: int | None, *, desc: str, unit: str, setting: str, initial: int = 0,
                 leave: bool = True) -> Iterator[tqdm]:
    """A tqdm bar on stderr, disabled (every method a no-op, `.disable` True) unless `wanted(setting)`.
    `leave=False`: erased when done (a bar inside another's step, e.g. evaluation during training)."""
    show = wanted(setting)
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not show, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1, leave=leave)
    try:
        with logging_redirect_tqdm() if show else contextlib.nullcontext():
            yield bar
    finally:
        bar.close()
