"""The command line's one argument style: config positional, overrides anywhere, TRL / verl aliases, help, version."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from entrl import __version__
from entrl import config as C
from entrl.cli import _config_and_overrides, build_parser, main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# `eval` is reworked by the lead and `export` gets its flags from another change: their help is theirs.
NOT_OURS = {"eval", "export"}


def _subparsers(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix}{name} ")
    yield prefix.strip(), parser


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"entrl {__version__}"


def test_command_line_mistakes_are_one_line(capsys):
    """argparse's own errors (a bad flag value, clashing flags, no command) read like every other
    user mistake: one `entrl: config error:` line naming the command, exit 2, no usage block."""
    for argv, needle in ((["eval", "--n", "abc"], "entrl eval: argument --n: invalid int value: 'abc'"),
                         (["plan", "x.yaml", "--eval", "--no-eval"], "entrl plan: argument --no-eval"),
                         ([], "entrl: the following arguments are required: cmd")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("entrl: config error: ") and needle in err, err


def test_every_flag_has_help():
    missing = [f"{name}: {a.option_strings or a.dest}" for name, parser in _subparsers(build_parser())
               if name.split(" ")[0] not in NOT_OURS for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing, missing


@pytest.mark.parametrize("argv, config, overrides", [
    (["train", "c.yaml", "a.b=1", "--no-resume", "c.d=2"], "c.yaml", ["a.b=1", "c.d=2"]),
    (["semantic-entropy", "c.yaml", "--data", "d", "--out", "o.jsonl", "a.b=1"], "c.yaml", ["a.b=1"]),
    (["semantic-entropy", "--config", "c.yaml", "--data", "d", "--out", "o.jsonl", "a.b=1", "x.y=2"], "c.yaml",
     ["a.b=1", "x.y=2"]),
    (["ablate", "demo", "--quick", "a.b=1", "--seeds", "0,1"], "demo", ["a.b=1"]),
    (["config", "loss.name=grpo"], None, ["loss.name=grpo"]),
    # the older --config spelling works wherever a command reads a run config (README)
    (["train", "--config", "c.yaml", "a.b=1"], "c.yaml", ["a.b=1"]),
    (["plan", "--config", "c.yaml", "--hbm-gb", "4"], "c.yaml", []),
    (["ablate", "--config", "demo", "--quick"], "demo", []),
    (["config", "--config", "c.yaml", "a.b=1"], "c.yaml", ["a.b=1"]),
    (["train", "c.yaml", "num_generations=4", "actor_rollout_ref.actor.optim.lr=2e-6"], "c.yaml",
     ["rollout.n=4", "optim.lr=2e-6"]),
])
def test_config_positional_and_overrides_anywhere(argv, config, overrides, capsys):
    args = build_parser().parse_args(argv)
    assert _config_and_overrides(args, required=False) == (config, overrides)
    notes = capsys.readouterr().err
    assert ("is TRL's name" in notes) == ("num_generations=4" in argv)


def test_config_errors_are_one_line(tmp_path, capsys):
    data = ["--data", "d.jsonl", "--out", str(tmp_path / "o.jsonl")]
    assert main(["semantic-entropy", *data]) == 2
    assert "give a config" in capsys.readouterr().err
    assert main(["semantic-entropy", "demo", "--config", "other", *data]) == 2
    assert "two configs given" in capsys.readouterr().err
    out = str(tmp_path / "x")
    for argv, needle in [
        (["train"], "give a config"),
        (["semantic-entropy", "demo", *data], "data.task=math"),  # the demo's task would ignore the file
        (["semantic-entropy", "demo", "data.task=math", *data, "--n", "0"], "--n 0"),
        (["demo", "--quick", "--seed", "-1", "--out", out], "--seed -1"),
        (["demo", "--quick", "--out", out, f"train.out_dir={out}"], "give --out"),
        (["ablate", "demo", "--quick", "--methods", ",", "--out", out], "--methods"),
        (["ablate", "demo", "--quick", "--seeds", "a,b", "--out", out], "--seeds"),
        (["ablate", "demo", "--quick", "--seeds", "-1", "--out", out], "--seeds"),
        (["ablate", "demo", "--quick", "--seeds", "1,1", "--out", out], "--seeds"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("entrl: config error:") and err.count("\n") == 1 and needle in err, (argv, err)
    assert not (tmp_path / "x").exists()  # refused before anything was written
    # an --out that is a file, or a directory holding other things (here: a model's config.json), is not written into
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for argv, needle in [(["demo", "--quick", "--out", str(tmp_path / "notes.txt")], "is a file"),
                         (["demo", "--quick", "--out", str(tmp_path / "model")], "config.json"),
                         (["ablate", "demo", "--quick", "--out", str(tmp_path / "model")], "config.json")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("entrl: config error:") and err.count("\n") == 1 and needle in err, (argv, err)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]


def test_aliases_reach_the_config(capsys):
    assert main(["config", "demo.yaml", "max_completion_length=77", "epsilon=0.3", "loss.name=grpo",
                 "actor_rollout_ref.actor.clip_ratio_high=0.28", "algorithm.filter_groups.enable=true"]) == 0
    out, err = capsys.readouterr()
    cfg = yaml.safe_load(out)
    assert cfg["rollout"]["max_new_tokens"] == 77 and cfg["train"]["only_mixed_groups"] is True
    # epsilon sets both bounds unless the upper one is given on the same line.
    assert cfg["loss"]["params"] == {"clip_low": 0.3, "clip_high": 0.28}
    assert "entrl: note: max_completion_length is TRL's name: using rollout.max_new_tokens=77" in err
    assert "entrl: note: epsilon is TRL's name: using loss.params.clip_low=0.3\n" in err
    assert len(err.strip().splitlines()) == 4
    assert C.load_config(None, ["beta=0.01", "num_generations=4"]).loss.kl_coef == 0.01  # library path too
    # a boolean alias of a key that is no longer boolean: the note says the value used
    assert main(["config", "demo.yaml", "gradient_checkpointing=true"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["remat"] == "full" and "using model.remat=full" in err, err


def test_aliases_are_unambiguous_and_in_the_readme():
    valid = {f"{s.name}.{f.name}" for s in dataclasses.fields(C.RunConfig)
             for f in dataclasses.fields(typing_section(s))}
    table = README.split("## Coming from TRL / verl", 1)[1].split("\n## ", 1)[0]
    for name, (targets, origin) in C.ALIASES.items():
        assert name not in valid, f"{name} is an entrl key: it cannot be an alias"
        for t in targets:
            assert t.startswith("loss.params.") or t in valid, t
        assert re.search(rf"`{re.escape(name)}` ✓", table), f"README table lacks {origin}'s {name} ✓"
    marked = set(re.findall(r"`([\w.]+)` ✓", table))
    assert marked == set(C.ALIASES), marked ^ set(C.ALIASES)


def typing_section(field):
    import typing

    return typing.get_type_hints(C.RunConfig)[field.name]


def test_plot_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "data.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n' * 3)
    for target, needle in [("nothing", "not a run directory"), ("data.jsonl", "not a run directory"),
                           ("empty_run", "no step yet"), ("missing", "not a run directory")]:
        assert main(["plot", str(tmp_path / target)]) == 2, target
        err = capsys.readouterr().err
        assert err.startswith("entrl: config error:") and err.count("\n") == 1 and needle in err, (target, err)
    assert not list(tmp_path.rglob("plots"))
