"""Progress bars: drawn on process 0 only, when asked or when stderr is a terminal; log lines stay above them."""

import io
import logging
import re

import jax
import pytest

from entrl import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("setting, tty, process, drawn", [
    ("auto", False, 0, False),  # redirected logs and CI: no carriage-return bars
    ("auto", True, 0, True),
    ("on", False, 0, True),
    ("off", True, 0, False),
    ("on", True, 1, False),  # only process 0 draws
    ("auto", True, 1, False),
])
def test_wanted(monkeypatch, setting, tty, process, drawn):
    monkeypatch.setattr("sys.stderr", _Terminal() if tty else io.StringIO())
    monkeypatch.setattr(jax, "process_index", lambda: process)
    assert progress.wanted(setting) is drawn


def test_bad_setting():
    with pytest.raises(ValueError, match="auto, on, off"):
        progress.wanted("yes")


def test_bar_with_eta_and_log_lines_above_it(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    log = logging.getLogger("entrl.test_progress")
    handler = logging.StreamHandler(err)  # the CLI's console handler: on the root logger (logging.basicConfig)
    logging.root.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with progress.progress_bar(4, initial=1, desc="train", unit="step", setting="on") as bar:
            assert not bar.disable
            bar.update(1)
            log.info("a log line")
            bar.update(2)
    finally:
        logging.root.removeHandler(handler)
    text = err.getvalue()
    assert re.search(r"train: +\d+%\|.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d", text), text  # count, elapsed < ETA
    assert re.search(r"\r +\ra log line\n", text), repr(text)  # the bar cleared first: the line is not glued to it
    with progress.progress_bar(4, desc="train", unit="step", setting="off") as bar:
        assert bar.disable
        bar.update(4)
    assert err.getvalue() == text  # a disabled bar writes nothing
