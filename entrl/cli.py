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

A user mistake or a broken environment ends in one line on stderr, never a
traceback (`-v` shows the traceback of an I/O error). Exit codes: 0 done; 2 a
configuration error (one line on stderr, nothing compiled; includes a run
directory in use by another run); 3 training stopped on non-finite steps; 4 an
I/O error (an output path cannot be written: disk full, read-only, not a
directory; one line naming the path and the reason); 143 (128 + SIGTERM)
stopped by SIGTERM after writing a checkpoint: rerun the same command to
resume; anything else is a crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


EXIT_CONFIG, EXIT_NONFINITE, EXIT_IO = 2, 3, 4


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub logs through a handler of its own and to the root logger (every line twice), and
    # offline it warns once per retry before raising the error `main` reports in one line. Its level is
    # read from the environment when it is imported (later, lazily), hence the variable.
    logging.getLogger("huggingface_hub").propagate = False
    if not verbose:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if not verbose:
        # orbax logs the traceback of a failed write (from every thread it touched: hundreds of lines for
        # a full disk; its metadata writer once more) and then raises the same error in the caller, which
        # `main` turns into one line: keep only the raise. `-v` shows them.
        import absl.logging  # noqa: F401  (absl replaces a plain "absl" logger made before its import)

        logging.getLogger("absl").addFilter(_not_a_logged_raise)


def _not_a_logged_raise(r: logging.LogRecord) -> bool:
    """False for orbax's error records of an error it raises next: its "[process=N]" thread reports and
    any record carrying an OSError (a disk error, reported once by `main`)."""
    if not r.exc_info or r.levelno < logging.ERROR:
        return True
    exc = r.exc_info[1] if isinstance(r.exc_info, tuple) else None
    return not (str(r.msg).startswith("[process=") or isinstance(exc, OSError))


class _BackgroundIOErrors:
    """OSErrors of background threads (TensorBoard's event writer, ...) held back for one line at the end.

    Such a writer fails on the same full or read-only disk as the main thread, usually first, and
    would print its traceback; after any I/O error, the same disk's OSErrors from atexit handlers
    (writers flushing on exit) are dropped too. Installed by `main` unless `-v`.
    """

    def __init__(self):
        import threading

        self.first: OSError | None = None
        self._thread_hook, self._unraisable_hook = threading.excepthook, sys.unraisablehook
        threading.excepthook, sys.unraisablehook = self._on_thread_error, self._on_unraisable

    def _on_thread_error(self, a) -> None:
        if not issubclass(a.exc_type, OSError):
            return self._thread_hook(a)
        self.first = self.first or a.exc_value

    def _on_unraisable(self, u) -> None:
        if self.first is not None and isinstance(u.exc_value, OSError):
            return
        self._unraisable_hook(u)

    def restore(self) -> None:
        """Put the previous hooks back (kept after an I/O error: atexit handlers still have to run)."""
        import threading

        if self.first is None:
            threading.excepthook, sys.unraisablehook = self._thread_hook, self._unraisable_hook


def _io_error_line(e: OSError) -> str:
    """`path: reason` for an OSError (its first line only)."""
    if e.filename is not None and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror}"
    return " ".join(str(e).split())


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

    def error(self, message):
        """A command-line mistake in one line (the usage block is `entrl <command> --help`), exit 2."""
        self.exit(EXIT_CONFIG, f"entrl: config error: {self.prog}: {' '.join(message.split())} (see {self.prog} "
                               "--help)\n")


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
    args.output_dir = cfg.train.out_dir  # named in a one-line I/O error
    train_from_config(cfg, resume=not (args.no_resume or args.overwrite), overwrite=args.overwrite)
    return 0


def _check_own_out(out: str, own: tuple[str, ...], what: str) -> None:
    """ConfigError unless `out` is new, empty, or holds only what `what` writes (`own`: names, `*` patterns):
    a file, a model or run directory, or any other directory with files in it would be written into."""
    import fnmatch
    from pathlib import Path

    from entrl.config import ConfigError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    other = sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in own)) \
        if path.is_dir() else []
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ConfigError(f"--out {out} holds files {what} did not write ({shown}); give a new or empty directory, "
                          f"or the --out of an earlier {what}")


def cmd_demo(args) -> int:
    from entrl.config import ConfigError
    from entrl.demo import run_demo

    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: must be >= 0")
    overrides = _overrides(args)
    if any(o.split("=", 1)[0].strip() == "train.out_dir" for o in overrides):
        raise ConfigError("the demo writes its RL run to <--out>/rl: give --out instead of train.out_dir")
    _check_own_out(args.out, ("warmstart", "rl", "plots", "summary.json"), "entrl demo")
    run_demo(out_dir=args.out, overrides=overrides, seed=args.seed, quick=args.quick)
    return 0


def cmd_eval(args) -> int:
    """`entrl eval [CONFIG] [overrides]`: the config's `eval.*`; each flag is a shortcut for a key."""
    from entrl import config as C
    from entrl.eval_suites import results_markdown, run_eval

    config, overrides = _config_and_overrides(args, required=False)
    shortcuts = {"model": "model.path", "tokenizer": "model.tokenizer", "dtype": "model.dtype",
                 "benchmarks": "eval.benchmarks", "data_dir": "eval.data_dir", "n": "eval.n", "k": "eval.k",
                 "max_new_tokens": "eval.max_new_tokens", "temperature": "eval.temperature", "top_p": "eval.top_p",
                 "top_k": "eval.top_k",
                 "max_problems": "eval.max_problems", "batch_size": "eval.batch_problems", "seed": "eval.seed",
                 "out": "eval.out_dir"}
    flags = []
    for name, key in shortcuts.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name in ("benchmarks", "k"):
            value = "[" + ", ".join(v.strip() for v in str(value).split(",") if v.strip()) + "]"
        flags.append(f"{key}={value}")
    if not config and not args.model:
        raise C.ConfigError("entrl eval: give a config (its model.path is evaluated) or --model")
    cfg = C.load_config(config, [*flags, *overrides])
    if not cfg.eval.out_dir:
        cfg = C.replace(cfg, **{"eval.out_dir": "eval_out"})
    print(results_markdown(run_eval(cfg)))
    return 0


def cmd_semantic_entropy(args) -> int:
    from entrl import config as C
    from entrl.rl.setup import annotate_dataset

    cfg = C.load_config(*_config_and_overrides(args))
    if args.n is not None and args.n < 1:
        raise C.ConfigError(f"--n {args.n}: samples per prompt must be >= 1 (default curriculum.samples)")
    if cfg.data.task != "math":  # the arithmetic task generates its own prompts and would ignore the file
        raise C.ConfigError(f"--data {args.data}: the config has data.task={cfg.data.task}, which generates its "
                            "prompts; add data.task=math to annotate the file's problems")
    from entrl.rundir import as_path, inside

    if inside(as_path(args.out, "--out"), as_path(args.data, "--data")):  # prompts it drops would be lost
        raise C.ConfigError(f"--out {args.out!r} would overwrite the input --data {args.data!r}: write the "
                            "annotated copy elsewhere")
    written = annotate_dataset(cfg, data=args.data, out=args.out, n=args.n, resume=not args.no_resume)
    print(f"wrote {written} annotated prompts to {args.out}")
    return 0


def cmd_export(args) -> int:
    from entrl.rl.setup import export_run

    export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    return 0


def cmd_plot(args) -> int:
    from entrl.config import ConfigError
    from entrl.metrics import JSONL_NAME, plot_runs, read_metrics
    from entrl.rundir import as_path

    runs = []
    for given in args.run_dirs:
        path = as_path(given, "run directory")
        run = path.parent if path.name == JSONL_NAME and path.is_file() else path
        if not (run / JSONL_NAME).is_file():
            raise ConfigError(f"{given}: not a run directory (no {JSONL_NAME} in it)")
        if not read_metrics(run):
            raise ConfigError(f"{given}: {JSONL_NAME} holds no step yet")
        runs.append(run)
    out = args.out or str(runs[0] / "plots")
    for p in plot_runs(runs, out):
        print(p)
    return 0


def cmd_ablate(args) -> int:
    from entrl.ablate import run_ablation
    from entrl.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods {args.methods!r}: name at least one method (see `entrl ablate --help`)")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {args.seeds!r}: seeds must be distinct and >= 0")
    config, overrides = _config_and_overrides(args)
    _check_own_out(args.out, ("base", "seed*", "plots", "ablation.md", "ablation.json"), "entrl ablate")
    print(run_ablation(config, methods, seeds, overrides=overrides, out_dir=args.out, demo=args.demo,
                       quick=args.quick))
    return 0


def cmd_plan(args) -> int:
    """`entrl plan`: the memory plan of a run, or of every mesh its YAML suggests (`--suggested`)."""
    import json
    import math
    import os
    from pathlib import Path

    from entrl.config import ConfigError
    from entrl.plan import GIB, mesh_suggestions, parse_target

    config, overrides = _config_and_overrides(args)
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: must be >= 1 (simulated CPU devices)")
    if args.hbm_gb is not None and not (math.isfinite(args.hbm_gb) and args.hbm_gb > 0):
        raise ConfigError(f"--hbm-gb {args.hbm_gb}: must be a positive number of GiB")
    if not (math.isfinite(args.headroom) and 0 <= args.headroom < 1):
        raise ConfigError(f"--headroom {args.headroom}: must be in [0, 1) (the share of the budget kept free)")
    if not (args.hbm_gb or args.target or args.suggested):  # known before minutes of compiling
        if args.devices:
            raise ConfigError(f"no memory budget for {args.devices} simulated CPU devices: give --target (e.g. "
                              "tpu-v5p-8) or --hbm-gb")
        from entrl.plan import device_budget

        budget, why = device_budget()
        if budget is None:
            raise ConfigError(f"no memory budget: these devices report none ({why}); give --target (e.g. "
                              "tpu-v5p-8) or --hbm-gb")
    runs = []  # (label, target or None, overrides)
    if args.suggested:
        found = mesh_suggestions(config) if Path(config).exists() else []
        if not found:
            raise ConfigError(f"{config}: no mesh suggestions (`#   <slice>: mesh.data=.. mesh.fsdp=.. mesh.tensor=..` "
                              "lines) in it or its base files")
        runs = [(label, target, [*ovr, *overrides]) for label, target, ovr in found]
    else:
        runs = [(args.target or "", parse_target(args.target) if args.target else None, overrides)]
    results = []
    for label, target, ovr in runs:
        devices = args.devices or (target.devices if target else None)
        budget = int(args.hbm_gb * GIB) if args.hbm_gb else (target.hbm_bytes if target else None)
        source = "--hbm-gb" if args.hbm_gb else (str(target) if target else "")
        results.append((label, _plan_one(config, ovr, devices, budget, source, args.headroom, not args.no_eval,
                                         args.eval)))
    if args.json:
        out = results[0][1] if len(results) == 1 else {"plans": [{"target": lbl, **r} for lbl, r in results],
                                                        "fits": all(r["fits"] for _, r in results)}
        print(json.dumps(out, indent=2))
    else:
        for label, r in results:
            print((f"== {label}\n" if label else "") + r["table"] + "\n")
    fits = [r["fits"] for _, r in results]
    if any(f is None for f in fits):
        raise ConfigError("no memory budget: the devices report none; give --target (e.g. tpu-v5p-8) or --hbm-gb")
    del os
    return 0 if all(fits) else 3


def _plan_one(config, overrides, devices, budget, source, headroom, with_eval, eval_only=False) -> dict:
    """One plan as a JSON-able dict (with its `table`), in this process when its devices are these, else
    in a subprocess with `devices` simulated CPU devices."""
    import json
    import os
    import subprocess
    import sys

    from jax._src import xla_bridge

    from entrl.config import ConfigError

    here = xla_bridge.backends_are_initialized()
    if devices and not here:  # nothing touched a device yet: simulate them in this process
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if devices and jax.device_count() != devices:
        cmd = [sys.executable, "-m", "entrl.cli", "plan", config, *overrides, "--devices", str(devices), "--json",
               "--headroom", str(headroom)] + ([] if with_eval else ["--no-eval"]) + (["--eval"] if eval_only else [])
        if budget:
            cmd += ["--hbm-gb", repr(budget / 2**30)]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode not in (0, 3):
            raise ConfigError(proc.stderr.strip().splitlines()[-1].removeprefix("entrl: config error: ")
                              if proc.stderr.strip() else f"plan subprocess failed ({proc.returncode})")
        out = json.loads(proc.stdout)
        if source:
            out["budget_source"] = source
        return out
    from entrl import config as C
    from entrl.plan import device_budget, plan_eval, plan_run

    if budget is None:
        budget, source = device_budget()
    cfg = C.load_config(config, overrides)
    if eval_only:
        plan = plan_eval(cfg, budget_bytes=budget, budget_source=source, headroom=headroom)
    else:
        plan = plan_run(cfg, budget_bytes=budget, budget_source=source, headroom=headroom, with_eval=with_eval)
    return {**plan.to_json(), "table": plan.table()}


def cmd_config(args) -> int:
    import yaml

    from entrl import config as C
    from entrl.rl import loss_specs

    if args.reference:
        print(C.docs_table())
        return 0
    if args.losses:
        print(loss_specs.markdown_table())
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

    p = _Parser(prog="entrl", description="RL for LLM reasoning with semantic and token entropy (SENT).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"entrl {__version__}", help="print the version and exit")
    p.add_argument("--portable-cpu", action="store_true",
                   help="CPU numbers that do not depend on the machine: XLA:CPU capped at AVX2 and one core "
                        "(slower; see README, 'Which numbers depend on the machine')")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="run RL training from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (e.g. configs/paper/r1-distill-qwen-1.5b/sent.yaml) or a "
                                             "preset name")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
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

    e = sub.add_parser("eval", help="pass@k / avg@k / maj@k on the paper's benchmarks (the config's eval.*)")
    e.add_argument("config", nargs="?", help="YAML config: its eval.*, model.*, mesh.* and data.* settings")
    e.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    e.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option")
    e.add_argument("--model", default=None, help="model.path: HF checkpoint dir, hub id, or entrl run dir")
    e.add_argument("--benchmarks", default=None, help="eval.benchmarks, comma-separated names or paths "
                                                      f"(default {BENCHMARKS})")
    e.add_argument("--data-dir", default=None, help="eval.data_dir: directory of <benchmark>.jsonl files "
                                                    "(default: hub datasets)")
    e.add_argument("--n", type=int, default=None, help="eval.n: samples per problem (default 32)")
    e.add_argument("--k", default=None, help="eval.k, comma-separated (default 1,8,16,32)")
    e.add_argument("--out", default=None, help="eval.out_dir (default eval_out)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens (default 8000)")
    e.add_argument("--temperature", type=float, default=None, help="eval.temperature (default 1.0)")
    e.add_argument("--top-p", type=float, default=None, help="eval.top_p (default 1.0)")
    e.add_argument("--top-k", type=int, default=None, help="eval.top_k (default 0 = off)")
    e.add_argument("--max-problems", type=int, default=None, help="eval.max_problems per benchmark (0 = all)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="eval.batch_problems: problems per sampler call (0 = sized from the memory plan)")
    e.add_argument("--seed", type=int, default=None, help="eval.seed")
    e.add_argument("--tokenizer", default=None, help="model.tokenizer (default: the model's)")
    e.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="model.dtype: compute and weight dtype of evaluation (default float32, or the config's)")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("semantic-entropy", help="annotate a dataset with per-prompt semantic entropy")
    s.add_argument("config", nargs="?", help="YAML config whose model, rollout and curriculum.samples are used")
    s.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
    s.add_argument("--data", required=True, help="JSONL/Parquet path or hub id (read with the config's data.* keys)")
    s.add_argument("--out", required=True, help="output .jsonl or .parquet (resumable)")
    s.add_argument("--n", type=int, default=None, help="samples per prompt (default curriculum.samples)")
    s.add_argument("--no-resume", action="store_true",
                   help="sample every prompt again (the old progress file is moved aside, not deleted)")
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

    from entrl.methods import DEFAULT_METHODS, METHODS

    a = sub.add_parser("ablate", help="run one config with several methods and seeds; print a table",
                       epilog="methods (loss, curriculum): " + "; ".join(
                           f"{name} ({m.loss}, {m.curriculum})" for name, m in METHODS.items()))
    a.add_argument("config", nargs="?", help="YAML config, or 'demo' for the embedded demo (configs with "
                                             "warmstart.enabled, e.g. configs/collapse.yaml, also share one warm "
                                             "start per seed)")
    a.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
    a.add_argument("--methods", "--losses", dest="methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods: a loss plus its curriculum setting, the baselines without the "
                        "SE curriculum, SENT with it (default: the eight columns of the paper's comparison)")
    a.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    a.add_argument("--out", default="ablate_out", help="output directory, one run per seed and loss (resumable)")
    a.add_argument("--demo", action="store_true", help="run the embedded demo pipeline per loss")
    a.add_argument("--quick", action="store_true", help="with the demo pipeline: its tiny --quick sizes")
    a.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    a.set_defaults(fn=cmd_ablate)

    pn = sub.add_parser("plan", help="per-device memory of a run's phases (update, log-probs, rollout, eval), "
                                     "compiled abstractly: no weights read, nothing allocated")
    pn.add_argument("config", nargs="?", help="YAML config or preset name")
    pn.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pn.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
    pn.add_argument("--devices", type=int, default=None,
                    help="simulate this many CPU devices (default: the target's, else the real devices)")
    pn.add_argument("--target", default=None,
                    help="accelerator slice whose HBM is the budget: tpu-v5p-8, v5e-16, v4-8, 8xh100, a100-80gb, ...")
    pn.add_argument("--hbm-gb", type=float, default=None, help="HBM budget per device in GiB (overrides --target)")
    pn.add_argument("--headroom", type=float, default=0.1,
                    help="share of the budget kept free for what the estimate misses (default 0.1)")
    pn.add_argument("--suggested", action="store_true",
                    help="plan every mesh suggested in the config's YAML comments (`#   TPU v5p-8 (4 chips): mesh...`)")
    which = pn.add_mutually_exclusive_group()
    which.add_argument("--no-eval", action="store_true", help="skip the evaluation sampler")
    which.add_argument("--eval", action="store_true", help="plan `entrl eval` with this config instead of training")
    pn.add_argument("--json", action="store_true", help="print one JSON object (keys include fits, per_device_bytes)")
    pn.set_defaults(fn=cmd_plan)

    c = sub.add_parser("config", help="print the resolved config, or the configuration reference")
    c.add_argument("config", nargs="?", help="YAML config or preset name (default: the built-in defaults)")
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the config, as an option (older spelling)")
    c.add_argument("--reference", action="store_true", help="print the Markdown table of every config key")
    c.add_argument("--losses", action="store_true", help="print the Markdown table of every loss (loss.name)")
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


def portable_cpu() -> None:
    """Make XLA:CPU results independent of the host's instruction set and core count (`--portable-cpu`).

    Caps code generation at AVX2 with FMA (what every x86 CPU since 2013-2015 has: AVX-512 and AMX
    give the same bits on the demo but other shapes differ) and pins the process to one core
    (XLA:CPU splits loops and matmuls by the number of cores it sees, which changes the order of
    additions). Both are read when JAX creates its CPU backend, so this must run before the first
    JAX computation; later it only warns. The verifier's worker processes inherit the core.
    """
    import os

    log = logging.getLogger("entrl.cli")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa=AVX2".strip()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    backends = getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", None)
    if backends:
        log.warning("--portable-cpu: JAX's CPU backend already exists in this process; the cap and the core "
                    "count apply to new processes only")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.portable_cpu:
        portable_cpu()
    from entrl.config import ConfigError

    background = None if args.verbose else _BackgroundIOErrors()
    try:
        code = args.fn(args)
        if background is not None and background.first is not None:
            raise background.first
        return code
    except ConfigError as e:
        print(f"entrl: config error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        if args.verbose:
            raise
        out = getattr(args, "output_dir", None) or getattr(args, "out", None)
        where = f" (writing under {out})" if out and e.filename is None else ""
        print(f"entrl: I/O error: {_io_error_line(e)}{where}", file=sys.stderr)
        if background is not None:
            background.first = background.first or e
        return EXIT_IO
    except RuntimeError as e:
        from entrl.rl.setup import Preempted
        from entrl.rl.trainer import NonFiniteError

        if isinstance(e, Preempted):
            print(f"entrl: {e}", file=sys.stderr)
            return PREEMPTED_EXIT
        if not isinstance(e, NonFiniteError):
            raise
        print(f"entrl: training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        if background is not None:
            background.restore()


if __name__ == "__main__":
    sys.exit(main())
