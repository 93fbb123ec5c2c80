"""`entrl` command line: train | demo | eval | semantic-entropy | export | plot | ablate | config | data.

Each subcommand parses its arguments here and calls one library function; the
logic lives in the library so that notebooks and tests call the same code.
Heavy imports (jax, transformers) happen inside the handlers so `entrl --help`
is instant.

One argument style: a command that reads a run config takes it as its first
positional argument (`semantic-entropy` also keeps its older `--config`), and
every such command takes dotted overrides (`loss.name=grpo`) anywhere on the
line, also after options. TRL / verl option names that map to one entrl key
(`max_completion_length=2048`, `actor_rollout_ref.rollout.n=8`;
`entrl.config.ALIASES`) are accepted as overrides with a one-line note.

Exit codes: 0 done; 2 a configuration error (one line on stderr, nothing
compiled; includes a run directory in use by another run); 3 training stopped
on non-finite steps; 143 (128 + SIGTERM) stopped by SIGTERM after writing a
checkpoint: rerun the same command to resume; anything else is a crash.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Parser(argparse.ArgumentParser):
    """Positionals may follow options: `entrl train cfg.yaml --no-resume loss.name=grpo train.steps=5`."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):
        nested = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if nested or self._intermixed:  # argparse cannot intermix around a sub-command
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def _overrides(args) -> list[str]:
    """The command's dotted overrides with TRL / verl names rewritten (one note per alias on stderr)."""
    from entrl.config import expand_aliases

    overrides, notes = expand_aliases(list(args.overrides))
    for note in notes:
        print(f"entrl: note: {note}", file=sys.stderr)
    return overrides


def _config_and_overrides(args, *, required: bool = True) -> tuple[str | None, list[str]]:
    """The config (positional, or the older `--config`) and the overrides. An optional positional that
    reads `key=value` and is no file is the first override."""
    from pathlib import Path

    from entrl.config import ConfigError

    config, extra = args.config, []
    if config and "=" in config and not Path(config).exists():
        config, extra = None, [config]
    opt = getattr(args, "config_opt", None)
    if opt and config and config != opt:
        raise ConfigError(f"two configs given ({config!r} and --config {opt!r}); give one")
    config = config or opt
    if required and not config:
        raise ConfigError(f"entrl {args.cmd}: give a config (a YAML file or a preset name) as the first argument")
    args.overrides = extra + list(args.overrides)
    return config, _overrides(args)


def cmd_train(args) -> int:
    from entrl import config as C
    from entrl.rl.setup import train_from_config

    cfg = C.load_config(*_config_and_overrides(args))
    train_from_config(cfg, resume=not (args.no_resume or args.overwrite), overwrite=args.overwrite)
    return 0


def cmd_demo(args) -> int:
    from entrl.demo import run_demo

    run_demo(out_dir=args.out, overrides=_overrides(args), seed=args.seed, quick=args.quick)
    return 0


def cmd_eval(args) -> int:
    from entrl.benchmarks import run_eval_cli

    run_eval_cli(model=args.model, benchmarks=args.benchmarks.split(","), n=args.n,
                 ks=[int(k) for k in args.k.split(",")], out_dir=args.out, data_dir=args.data_dir,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 max_problems=args.max_problems, batch_size=args.batch_size, seed=args.seed,
                 tokenizer=args.tokenizer)
    return 0


def cmd_semantic_entropy(args) -> int:
    from entrl import config as C
    from entrl.semantic_entropy import annotate_cli

    cfg = C.load_config(*_config_and_overrides(args))
    annotate_cli(cfg, data=args.data, out=args.out, n=args.n)
    return 0


def cmd_export(args) -> int:
    from entrl.rl.setup import export_run

    export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    return 0


def cmd_plot(args) -> int:
    from entrl.metrics import plot_runs

    out = args.out or (args.run_dirs[0] + "/plots")
    for p in plot_runs(args.run_dirs, out):
        print(p)
    return 0


def cmd_ablate(args) -> int:
    from entrl.ablate import run_ablation

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    config, overrides = _config_and_overrides(args)
    print(run_ablation(config, methods, seeds, overrides=overrides, out_dir=args.out, demo=args.demo,
                       quick=args.quick))
    return 0


def cmd_config(args) -> int:
    import yaml

    from entrl import config as C

    if args.reference:
        print(C.docs_table())
        return 0
    cfg = C.load_config(*_config_and_overrides(args, required=False))
    print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    return 0


def cmd_data_prepare(args) -> int:
    from entrl.config import ConfigError
    from entrl.data.prepare import prepare

    if args.overrides and not args.se_config:
        raise ConfigError(f"overrides {args.overrides} given without --se-config (they apply to its config)")
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    prepare(args.source, args.out, split=args.split, problem_key=args.problem_key, answer_key=args.answer_key,
            id_key=args.id_key, id_prefix=args.id_prefix, source_name=args.source_name, benchmarks=benchmarks,
            bench_dir=args.bench_dir, max_rows=args.max_rows, se_config=args.se_config, se_overrides=_overrides(args))
    return 0


def cmd_data_prepare_benchmarks(args) -> int:
    from entrl.data.prepare import prepare_benchmarks

    prepare_benchmarks(args.out, [b for b in args.benchmarks.split(",") if b])
    return 0


OVERRIDES_HELP = ("dotted config overrides, anywhere on the line: loss.name=grpo optim.lr=2e-6 (TRL / verl names "
                  "such as max_completion_length=2048 are accepted; README: Coming from TRL / verl)")
BENCHMARKS = "aime24,aime25,amc23,math500,minerva,olympiadbench"


def build_parser() -> argparse.ArgumentParser:
    from entrl import __version__

    p = argparse.ArgumentParser(prog="entrl", description="RL for LLM reasoning with semantic and token entropy (SENT).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"entrl {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="run RL training from a YAML config")
    t.add_argument("config", help="YAML config (e.g. configs/paper/r1-distill-qwen-1.5b/sent.yaml) or a preset name")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--no-resume", action="store_true",
                   help="start from scratch (refused when train.out_dir holds a run, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true",
                   help="delete the run in train.out_dir (checkpoints, metrics, policy) and start from scratch")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("demo", help="the embedded CPU demo: warm-start, SE curriculum, SENT RL, before/after eval")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--seed", type=int, default=0, help="seed of the task, warm start and RL (default: 0)")
    d.add_argument("--quick", action="store_true", help="a tiny, fast version (for tests and smoke checks)")
    d.add_argument("overrides", nargs="*", help="dotted overrides of the demo's RL config")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="pass@k / avg@k / maj@k on the paper's benchmarks")
    e.add_argument("--model", required=True, help="HF checkpoint dir, hub id, or entrl run dir")
    e.add_argument("--benchmarks", default="aime24,aime25,amc23,math500,minerva,olympiadbench")
    e.add_argument("--data-dir", default=None, help="directory of <benchmark>.jsonl files (default: hub datasets)")
    e.add_argument("--n", type=int, default=32)
    e.add_argument("--k", default="1,8,16,32")
    e.add_argument("--out", default="eval_out")
    e.add_argument("--max-new-tokens", type=int, default=8000)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--max-problems", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=64, help="problems per sampler call")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--tokenizer", default=None)
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("semantic-entropy", help="annotate a dataset with per-prompt semantic entropy")
    s.add_argument("config", nargs="?", help="YAML config whose model, rollout and curriculum.samples are used")
    s.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
    s.add_argument("--data", required=True, help="JSONL/Parquet path or hub id (read with the config's data.* keys)")
    s.add_argument("--out", required=True, help="output .jsonl or .parquet (resumable)")
    s.add_argument("--n", type=int, default=None, help="samples per prompt (default curriculum.samples)")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_semantic_entropy)

    x = sub.add_parser("export", help="write a run's policy as a Hugging Face checkpoint")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="output directory (local or gs://)")
    x.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="tensor dtype (default: the dtype of the run's source model; float32 for the demo model)")
    x.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plot", help="entropy / reward / length curves of one or more runs")
    pl.add_argument("run_dirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    pl.add_argument("--out", default=None, help="directory for the PNGs (default: <first run>/plots)")
    pl.set_defaults(fn=cmd_plot)

    from entrl.ablate import DEFAULT_METHODS, METHODS

    a = sub.add_parser("ablate", help="run one config with several methods and seeds; print a table",
                       epilog="methods (loss, curriculum): " + "; ".join(
                           f"{name} ({m.loss}, {m.curriculum})" for name, m in METHODS.items()))
    a.add_argument("config", help="YAML config, or 'demo' for the embedded demo (configs with warmstart.enabled, "
                                  "e.g. configs/collapse.yaml, also share one warm start per seed)")
    a.add_argument("--methods", "--losses", dest="methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods: a loss plus its curriculum setting, the baselines without the "
                        "SE curriculum, SENT with it (default: the eight columns of the paper's comparison)")
    a.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    a.add_argument("--out", default="ablate_out", help="output directory, one run per seed and loss (resumable)")
    a.add_argument("--demo", action="store_true", help="run the embedded demo pipeline per loss")
    a.add_argument("--quick", action="store_true", help="with the demo pipeline: its tiny --quick sizes")
    a.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    a.set_defaults(fn=cmd_ablate)

    c = sub.add_parser("config", help="print the resolved config, or the configuration reference")
    c.add_argument("config", nargs="?", help="YAML config or preset name (default: the built-in defaults)")
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.add_argument("--reference", action="store_true", help="print the Markdown table of every config key")
    c.set_defaults(fn=cmd_config)

    dt = sub.add_parser("data", help="build training and benchmark data files")
    dsub = dt.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    dp = dsub.add_parser("prepare", help="a training set from the hub or local files: strip instruction templates, "
                                         "repair encoding damage, deduplicate, decontaminate, optional SE column")
    dp.add_argument("source", help="'dapo17k' (= BytedTsinghua-SIA/DAPO-Math-17k), a hub id, or a "
                                   "JSONL/Parquet file or directory")
    dp.add_argument("--out", required=True, help="output .jsonl or .parquet (id, problem, answer, source, lang, extras)")
    dp.add_argument("--split", default="train", help="hub split (default: train)")
    dp.add_argument("--problem-key", default=None, help="problem column, dotted for nested (default: from the "
                                                        "preset, or 'prompt' for a verl layout, else 'problem')")
    dp.add_argument("--answer-key", default=None, help="answer column, dotted for nested (default: from the preset, "
                                                       "or 'reward_model.ground_truth' for a verl layout, else 'answer')")
    dp.add_argument("--id-key", default=None, help="id column ('' = row index; default: 'id' when present)")
    dp.add_argument("--id-prefix", default=None, help="output ids are <prefix>-<source id> (default: preset name "
                                                      "or file stem)")
    dp.add_argument("--source", dest="source_name", default=None, help="value of the output's source column")
    dp.add_argument("--benchmarks", default=BENCHMARKS, help=f"benchmarks to decontaminate against, comma-separated, "
                                                             f"'' = none (default: {BENCHMARKS})")
    dp.add_argument("--bench-dir", default=None, help="directory of <benchmark>.jsonl files (default: the hub; make "
                                                      "one with `entrl data prepare-benchmarks`)")
    dp.add_argument("--max-rows", type=int, default=0, help="read only the first N rows (0 = all)")
    dp.add_argument("--se-config", default=None, help="also annotate semantic entropy with this run config's model "
                                                      "(as `entrl semantic-entropy`; resumable)")
    dp.add_argument("overrides", nargs="*", help="dotted overrides of the --se-config config")
    dp.set_defaults(fn=cmd_data_prepare)
    db = dsub.add_parser("prepare-benchmarks", help="the evaluation benchmarks from the hub as <name>.jsonl files "
                                                    "(for `entrl eval --data-dir` / eval.data_dir)")
    db.add_argument("--out", required=True, help="output directory")
    db.add_argument("--benchmarks", default=BENCHMARKS, help=f"comma-separated names (default: {BENCHMARKS})")
    db.set_defaults(fn=cmd_data_prepare_benchmarks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from entrl.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"entrl: config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from entrl.rl.setup import Preempted
        from entrl.rl.trainer import NonFiniteError

        if isinstance(e, Preempted):
            print(f"entrl: {e}", file=sys.stderr)
            return PREEMPTED_EXIT
        if not isinstance(e, NonFiniteError):
            raise
        print(f"entrl: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
