"""Bad settings and broken disks end in exactly one line on stderr and a documented exit code (issue 15).

The cases run through `entrl.cli.main` in a child process that points file descriptor 2 at a file
for each case, so everything written to stderr counts: log lines, warnings, tracebacks of
background threads. One child runs all the configuration cases (one JAX start-up); the disk cases
need their own process because the limit on file size is per process.

A full disk without root: RLIMIT_FSIZE makes every write past the limit fail with EFBIG (SIGXFSZ
ignored), from the first checkpoint on, which exercises the same code paths as ENOSPC (orbax's
background writers, TensorBoard's writer thread, metrics appends). Where unprivileged user
namespaces work, a real 256 KiB tmpfs gives ENOSPC as well (skipped otherwise).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPU_TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["model.demo_layers=1", "model.demo_hidden=32", "model.demo_heads=2", "rollout.n=4",
        "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.minibatch_prompts=2",
        "train.microbatch_per_shard=4", "data.arithmetic_train_size=64", "data.arithmetic_heldout_size=16",
        "curriculum.enabled=false", "reward.workers=1", "mesh.data=1"]

_CHILD = r"""
import json, os, sys, threading
import jax
from entrl import cli

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if "compil" in event else None)
results = []
for argv in json.loads(sys.argv[1]):
    compiles.clear()
    read_end, write_end = os.pipe()  # a pipe, not a file: the disk cases limit file sizes
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        code = cli.main(argv)
    except BaseException as e:  # a crash is a result too: the test shows it
        import traceback
        traceback.print_exc()
        code = f"raised {type(e).__name__}"
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    reader.join()
    os.close(read_end)
    results.append({"code": code, "err": b"".join(chunks).decode(errors="replace"), "compiled": len(compiles)})
print("RESULTS " + json.dumps(results), flush=True)
"""


def _env():
    # one CPU device is enough (no device-count flag): it keeps the child's start-up short
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), XLA_FLAGS=CPU_TEST_XLA_FLAGS)


def _run_cases(cases: list[list[str]], *, prefix: list[str] = (), timeout: int = 600) -> list[dict]:
    out = subprocess.run([*prefix, sys.executable, "-c", _CHILD, json.dumps(cases)], env=_env(),
                         capture_output=True, text=True, timeout=timeout, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, f"child failed (rc {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(line[0][len("RESULTS "):])


def _assert_one_line(result: dict, code: int, prefix: str, *needles: str, progress_logs: bool = False) -> None:
    """Exactly one line on stderr; with `progress_logs`, not counting INFO log lines (no warning, no traceback)."""
    err = result["err"]
    if progress_logs:
        err = "".join(line for line in err.splitlines(keepends=True) if not _INFO.match(line))
    assert result["code"] == code, err
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got:\n{err}"
    assert err.startswith(prefix), err
    for needle in needles:
        assert needle in err, (needle, err)


_INFO = re.compile(r"\d\d:\d\d:\d\d INFO ")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_settings_are_one_line_config_errors(tmp_path):
    unknown_chars = _jsonl(tmp_path / "chars.jsonl", [{"id": "a", "problem": "1+2", "answer": "3"},
                                                      {"id": "b", "problem": "3#4 & 5", "answer": "7"}])
    long_prompt = _jsonl(tmp_path / "long.jsonl", [{"id": "short", "problem": "1+2", "answer": "3"},
                                                   {"id": "very-long", "problem": "1+" * 40 + "1", "answer": "41"}])
    math_data = ["data.task=math", "model.tokenizer=char", "data.prompt_suffix="]
    broken_reward = tmp_path / "broken_reward.py"
    broken_reward.write_text("1 / 0\n")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "bad_val.jsonl").write_text("{not json\n")
    unsupported = tmp_path / "gelu_model"
    unsupported.mkdir()
    (unsupported / "config.json").write_text('{"model_type": "qwen2", "hidden_act": "gelu"}')
    (unsupported / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    se_curriculum = ["curriculum.enabled=true", "curriculum.samples=4"]  # annotates first: errors must come before
    se_null = _jsonl(tmp_path / "se_null.jsonl", [{"id": f"r{i}", "problem": f"{i}+1", "answer": str(i + 1),
                                                   "se": None if i == 3 else 0.1 * i} for i in range(16)])
    weightless = tmp_path / "weightless_model"  # a model directory whose weights never arrived
    weightless.mkdir()
    (weightless / "config.json").write_text('{"model_type": "qwen2"}')
    one_arg = tmp_path / "one_arg_reward.py"
    one_arg.write_text("def score(response):\n    return 1.0\n")
    cases = {  # name: (overrides, words the line must contain)
        "lr nan": (["optim.lr=nan"], ["optim.lr=nan", "finite"]),
        "lr inf": (["optim.lr=.inf"], ["optim.lr=inf", "finite"]),
        "rollout temperature nan": (["rollout.temperature=nan"], ["rollout.temperature"]),
        "rollout temperature inf": (["rollout.temperature=inf"], ["rollout.temperature"]),
        "rollout temperature negative": (["rollout.temperature=-0.5"], ["rollout.temperature=-0.5"]),
        "eval temperature nan": (["eval.temperature=nan"], ["eval.temperature"]),
        "eval temperature negative": (["eval.temperature=-1"], ["eval.temperature"]),
        "verifier timeout nan": (["reward.timeout_s=nan"], ["reward.timeout_s"]),
        "verifier timeout inf": (["reward.timeout_s=inf"], ["reward.timeout_s"]),
        "kl coefficient nan": (["loss.kl_coef=nan"], ["loss.kl_coef"]),
        "adam beta": (["optim.b2=1.0"], ["optim.b2"]),
        "threshold nan": (["curriculum.thresholds=[0.5, .nan]"], ["curriculum.thresholds"]),
        "char tokenizer": ([*math_data, f"data.train={unknown_chars}"], ["row 1", "'b'", "#&"]),
        "long prompt": ([*math_data, f"data.train={long_prompt}", "data.on_long_prompt=error",
                         "data.max_prompt_len=16", "rollout.prompt_buckets=[16]"], ["'very-long'", "82 tokens"]),
        "context length": (["rollout.max_new_tokens=100000"], ["rollout.max_new_tokens=100000", "512"]),
        "reward module missing": (["reward.fn=no_such_rewards_module:fmt"], ["reward.fn", "no_such_rewards_module"]),
        "reward attribute missing": (["reward.fn=entrl.rewards:no_such_reward"], ["reward.fn", "no_such_reward"]),
        "reward not callable": (["reward.fn=entrl.rewards:MAX_ANSWER_CHARS"], ["reward.fn", "not a function"]),
        "reward import raises": ([f"reward.fn={broken_reward}:fmt"], ["reward.fn", "ZeroDivisionError"]),
        "reward spec form": (["reward.fn=[entrl.rewards]"], ["reward.fn[0]", "package.module:function"]),
        "reward weight count": (["reward.weights=[1.0, 0.5]"], ["reward.weights", "2 weights"]),
        "reward weight word": (["reward.fn=[entrl.rewards:math_reward, entrl.rewards:boxed_format_reward]",
                                "reward.weights=[1.0, lots]"], ["reward.weights[1]", "number"]),
        "reward weight nan": (["reward.weights=[.nan]"], ["reward.weights", "finite"]),
        "one response per prompt": (["rollout.n=1"], ["rollout.n=1", ">= 2"]),
        "refresh with thresholds": (["curriculum.enabled=true", "curriculum.refresh=true",
                                     "curriculum.thresholds=[0.5]"], ["curriculum.refresh", "thresholds"]),
        "refresh with likelihood SE": (["curriculum.enabled=true", "curriculum.refresh=true",
                                        "curriculum.se_weighting=likelihood"], ["curriculum.refresh", "se_weighting"]),
        "scope of a global loss": (["loss.name=grpo", "loss.scope_seqs=2"], ["loss.scope_seqs=2", "grpo"]),
        "scope not tiling": (["loss.name=sent_released", "loss.scope_seqs=3"], ["3 sequences", "8"]),
        "tokenizer missing": (["model.tokenizer=/no/such/tokenizer"], ["model.tokenizer='/no/such/tokenizer'",
                                                                      "does not exist"]),
        "tokenizer bare word": (["model.tokenizer=notatok"], ["model.tokenizer='notatok'", "does not exist"]),
        "tokenizer empty dir": ([f"model.tokenizer={tmp_path / 'no_tokenizer'}"], ["model.tokenizer=",
                                                                                  "without tokenizer files"]),
        "tokenizer a file": ([f"model.tokenizer={broken_reward}"], ["model.tokenizer=", "is a file"]),
        "model unsupported": ([f"model.path={unsupported}"], ["model.path=", "hidden_act='gelu'"]),
        "train seed": (["train.seed=-1"], ["train.seed=-1"]),
        "curriculum seed": ([*se_curriculum, "curriculum.seed=-1"], ["curriculum.seed=-1"]),
        "checkpoint every": (["train.checkpoint_every=-1"], ["train.checkpoint_every=-1", ">= 0"]),
        "loss param nan": (["loss.params.beta=nan"], ["loss.params.beta=nan", "finite number"]),
        "loss param overflow": (["loss.params.beta=1e999"], ["loss.params.beta=inf", "finite number"]),
        "val data missing": ([*se_curriculum, "train.eval_every=1", f"val.data={tmp_path / 'none.jsonl'}"],
                             ["val.data=", "none.jsonl"]),
        "val data bad json": ([*se_curriculum, "train.eval_every=1", f"val.data={tmp_path / 'bad_val.jsonl'}"],
                              ["val.data=", "bad_val.jsonl"]),
        "stage under a step": ([*se_curriculum, "data.arithmetic_train_size=6"],
                               ["curriculum stage 0 holds 3 of the 6 usable prompts", "train.prompts_per_step=4",
                                "curriculum.stages"]),
        "equivalent missing": ([*se_curriculum, "reward.equivalent=no_such_file.py:same"],
                               ["reward.equivalent", "no_such_file.py"]),
        "SE column not a number": ([*math_data, f"data.train={se_null}", "curriculum.enabled=true"],
                                   ["record 'r3'", "null, not a number"]),
        "model without weights": ([f"model.path={weightless}"], ["model.path=", "no weights"]),
        "val budget past the context": (["train.eval_every=1", "val.max_new_tokens=100000"],
                                        ["val.max_new_tokens=100000", "512"]),
        "alias beside its key": (["num_generations=2"], ["num_generations", "rollout.n", "give one"]),
        "negative SE threshold": (["curriculum.thresholds=[-5]"], ["curriculum.thresholds", "never negative"]),
        "reward signature": ([f"reward.fn={one_arg}:score"], ["reward.fn", "fn(response, reference, record)"]),
    }
    argvs = [["train", DEMO, *TINY, f"train.out_dir={tmp_path / name.replace(' ', '_')}", *over]
             for name, (over, _) in cases.items()]
    (tmp_path / "not_utf8.yaml").write_bytes(b"model:\n  tokenizer: \xff\xfe char\n")
    (tmp_path / "twice.yaml").write_text("rollout:\n  n: 4\ntrain:\n  steps: 1\nrollout:\n  temperature: 0.5\n")
    others = {  # other commands: (argv, words the line must contain)
        "yaml not utf-8": (["config", str(tmp_path / "not_utf8.yaml")], ["not UTF-8"]),
        "yaml key twice": (["config", str(tmp_path / "twice.yaml")], ["'rollout' appears twice"]),
        "ablate seed": (["ablate", DEMO, "--methods", "grpo", "--out", str(tmp_path / "ab"),
                         *[o for o in TINY if not o.startswith("curriculum.")], "train.seed=7"],
                        ["train.seed", "--seeds"]),
        "annotate over its input": (["semantic-entropy", DEMO, *TINY, *math_data, "--data", se_null, "--out", se_null],
                                    ["would overwrite the input"]),
        "prepare over its source": (["data", "prepare", se_null, "--out", se_null, "--benchmarks", ""],
                                    ["would overwrite the source"]),
    }
    argvs += [argv for argv, _ in others.values()]
    argvs.append(["config", DEMO, "optim.lr=nan"])
    argvs.append(["eval", "--model", str(tmp_path / "no-model"), "--temperature", "nan", "--out", str(tmp_path / "ev")])
    results = _run_cases(argvs)
    for (_, needles), result in zip(others.values(), results[len(cases):]):
        _assert_one_line(result, 2, "entrl: config error:", *needles)
    assert len(Path(se_null).read_text().splitlines()) == 16  # the inputs are left alone
    for (name, (_, needles)), result in zip(cases.items(), results):
        # INFO lines of setup steps that ran before the check are progress, not noise
        _assert_one_line(result, 2, "entrl: config error:", *needles, progress_logs=True)
        assert result["compiled"] == 0, f"{name}: compiled before failing"
        assert "memory check" not in result["err"], f"{name}: the memory check ran before the settings were checked"
        assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name}: the failed start left its run directory"
    _assert_one_line(results[-2], 2, "entrl: config error:", "optim.lr")
    _assert_one_line(results[-1], 2, "entrl: config error:", "eval.temperature")


def test_a_tokenizer_the_model_cannot_embed_is_refused():
    """Another model family's tokenizer: ids past the embedding table (XLA clamps them silently)."""
    from types import SimpleNamespace

    from entrl import config as C
    from entrl.build import check_tokenizer_fits

    cfg = C.load_config(None, ["model.path=/models/small", "model.tokenizer=/models/big-tokenizer"])
    check_tokenizer_fits(cfg, SimpleNamespace(vocab_size=57), 57)
    check_tokenizer_fits(cfg, SimpleNamespace(vocab_size=151_665), 152_064)  # Qwen: the table has spare rows
    with pytest.raises(C.ConfigError, match="tokenizer .*big-tokenizer.* has 96 tokens, the model .*embeds 57"):
        check_tokenizer_fits(cfg, SimpleNamespace(vocab_size=96), 57)


_DISK_RUN = ["train", DEMO, *TINY, "train.steps=2", "train.checkpoint_every=1", "train.tensorboard=true"]


@pytest.mark.parametrize("limit", [0, 4_000, 20_000])
def test_full_disk_is_one_line_io_error(tmp_path, limit):
    """Writes fail from the first byte (the run directory's probe refuses it), at the metrics and
    TensorBoard files, or in the middle of orbax's background checkpoint writers. A run that got going
    has written its INFO lines before; after them comes exactly one line."""
    limit_then_exec = ("import resource, signal, sys, os; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                       f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                       "os.execv(sys.argv[1], sys.argv[1:])")
    prefix = [sys.executable, "-c", limit_then_exec]
    out_dir = tmp_path / "run"
    (result,) = _run_cases([[*_DISK_RUN, f"train.out_dir={out_dir}"]], prefix=prefix)
    if limit == 0:  # nothing can be written: the run directory's own probe refuses it before anything starts
        _assert_one_line(result, 2, "entrl: config error:", str(out_dir))
    else:
        _assert_one_line(result, 4, "entrl: I/O error:", "too large", str(out_dir), progress_logs=True)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None,
                    reason="needs Linux user namespaces (unshare -rm) for an unprivileged tmpfs")
def test_real_enospc_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {mnt}"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged tmpfs here: {probe.stderr.strip()}")
    # The child mounts its own tmpfs in a new user + mount namespace, then runs the cases.
    prefix = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=256k tmpfs {mnt} && exec "$@"', "sh"]
    (result,) = _run_cases([[*_DISK_RUN, f"train.out_dir={mnt / 'run'}"]], prefix=prefix)
    _assert_one_line(result, 4, "entrl: I/O error:", "No space left on device", str(mnt / "run"), progress_logs=True)


def test_hub_retry_warnings_stay_off_stderr():
    """Offline, `datasets.load_dataset` of a hub id logs a warning per retry (through huggingface_hub's own
    handler and the root logger: each twice) before the error that `main` reports in one line. The
    CLI's logging set-up keeps them off stderr; an error of the hub's is printed once; `-v` shows warnings."""
    child = ("import sys; from entrl import cli; cli._setup_logging(sys.argv[1] == 'v'); "
             "from huggingface_hub.utils import logging as hub_logging; "
             "log = hub_logging.get_logger('huggingface_hub.utils._http'); "
             "log.warning('Retrying in 1s [Retry 1/5].'); log.error('hub error')")
    env = dict(_env())
    env.pop("HF_HUB_VERBOSITY", None)
    quiet, verbose = (subprocess.run([sys.executable, "-c", child, mode], env=env, capture_output=True, text=True,
                                     timeout=120, check=True).stderr for mode in ("q", "v"))
    assert quiet == "hub error\n"
    assert verbose.count("Retrying in 1s") == 1 and verbose.count("hub error") == 1
