"""`entrl` command line: train | demo | eval | semantic-entropy | export | plot | ablate | config.

Each subcommand parses its arguments here and calls one library function; the
logic lives in the library so that notebooks and tests call the same code.
Heavy imports (jax, transformers) happen inside the handlers so `entrl --help`
is instant.

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


def cmd_train(args) -> int:
    from entrl import config as C
    from entrl.rl.setup import train_from_config

    cfg = C.load_config(args.config, args.overrides)
    train_from_config(cfg, resume=not (args.no_resume or args.overwrite), overwrite=args.overwrite)
    return 0


def cmd_demo(args) -> int:
    from entrl.demo import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides, seed=args.seed, quick=args.quick)
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

    cfg = C.load_config(args.config, args.overrides)
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
    from entrl import config as C
    from entrl.ablate import run_ablation

    losses = args.losses.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(run_ablation(args.config, losses, seeds, overrides=args.overrides, out_dir=args.out, demo=args.demo,
                       quick=args.quick))
    return 0


def cmd_config(args) -> int:
    import yaml

    from entrl import config as C

    if args.reference:
        print(C.docs_table())
        return 0
    cfg = C.load_config(args.config, args.overrides)
    print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrl", description="RL for LLM reasoning with semantic and token entropy (SENT).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run RL training from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=grpo optim.lr=2e-6")
    t.add_argument("--no-resume", action="store_true",
                   help="start from scratch (refused when train.out_dir holds a run, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true",
                   help="delete the run in train.out_dir (checkpoints, metrics, policy) and start from scratch")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("demo", help="the embedded CPU demo: warm-start, SE curriculum, SENT RL, before/after eval")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--seed", type=int, default=0)
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
    s.add_argument("--config", required=True)
    s.add_argument("--data", required=True, help="JSONL/Parquet path or hub id")
    s.add_argument("--out", required=True, help="output .jsonl or .parquet (resumable)")
    s.add_argument("--n", type=int, default=None, help="samples per prompt (default curriculum.samples)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_semantic_entropy)

    x = sub.add_parser("export", help="write a run's policy as a Hugging Face checkpoint")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="output directory (local or gs://)")
    x.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="tensor dtype (default: the dtype of the run's source model; float32 for the demo model)")
    x.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plot", help="entropy / reward / length curves of one or more runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default=None)
    pl.set_defaults(fn=cmd_plot)

    a = sub.add_parser("ablate", help="run one config with several losses and seeds; print a table")
    a.add_argument("config", help="YAML config, or 'demo' for the embedded demo")
    a.add_argument("--losses", default="grpo,entropy_bonus,entropy_adv,high_entropy_mask,clip_cov,kl_cov,high_en,sent")
    a.add_argument("--seeds", default="0")
    a.add_argument("--out", default="ablate_out")
    a.add_argument("--demo", action="store_true", help="run the embedded demo pipeline per loss")
    a.add_argument("--quick", action="store_true", help="with the demo: its tiny --quick sizes")
    a.add_argument("overrides", nargs="*")
    a.set_defaults(fn=cmd_ablate)

    c = sub.add_parser("config", help="print the resolved config, or the configuration reference")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--reference", action="store_true")
    c.set_defaults(fn=cmd_config)
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
