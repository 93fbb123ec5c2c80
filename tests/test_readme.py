"""The README stays true: its commands parse and name real files, its config reference is generated.

Commands that run for real elsewhere: `entrl demo` and `entrl ablate demo` (test_demo.py), `entrl train`,
`export`, `plot` (test_trainer.py), `entrl eval` (test_eval_cli.py), `entrl semantic-entropy`
(test_annotate.py). Here every `entrl ...` line of the README must parse with the real CLI parser, every
config it names must load (with its dotted overrides), and the quickstart test command must be the one
`.ci/run` runs.
"""

import re
import shlex
from pathlib import Path

import pytest

from entrl import config as C
from entrl.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _commands():
    text = README.replace("\\\n", " ")
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if " -- entrl " in part:
                    part = part.split(" -- ", 1)[1]
                if part.startswith("launch/gpu_host.sh entrl"):
                    part = part.split(" ", 1)[1]
                if part.startswith("entrl "):
                    cmds.append(part)
    for line in text.splitlines():  # inline `entrl ...` commands
        for m in re.findall(r"`(entrl (?:train|eval|ablate|demo|plot|export|semantic-entropy) [^`]+)`", line):
            if "..." not in m and "<" not in m:
                cmds.append(m)
    return cmds


def test_readme_has_commands():
    cmds = _commands()
    assert any(c.startswith("entrl demo") for c in cmds)
    assert any(c.startswith("entrl train") for c in cmds)
    assert any(c.startswith("entrl eval") for c in cmds)


@pytest.mark.parametrize("cmd", _commands())
def test_readme_command_parses_and_its_config_loads(cmd):
    argv = shlex.split(cmd)[1:]
    args = build_parser().parse_args(argv)
    config = getattr(args, "config", None)
    if config and config.endswith(".yaml"):
        overrides = [o for o in args.overrides if not o.startswith("data.train=")]
        C.load_config(REPO / config, overrides)


def test_quickstart_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README


def test_config_reference_is_generated():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    assert start in README and end in README, "README lacks the generated configuration reference"
    block = README.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == C.docs_table(), "regenerate with: entrl config --reference"


def test_loss_table_is_generated():
    from entrl.rl import loss_specs

    start, end = "<!-- loss-table:start -->", "<!-- loss-table:end -->"
    assert start in README and end in README, "README lacks the generated table of losses"
    block = README.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == loss_specs.markdown_table(), "regenerate with: entrl config --losses"


def test_method_doc_describes_every_loss():
    from entrl.rl.loss_specs import LOSSES

    method = (REPO / "docs" / "method.md").read_text()
    missing = [name for name in LOSSES if f"`{name}`" not in method]
    assert not missing, f"docs/method.md does not describe {missing}"
