import dataclasses
import re
from pathlib import Path

import pytest

from entrl import config as C


def test_defaults_build_and_roundtrip():
    cfg = C.load_config()
    assert cfg.loss.name == "sent"
    again = C.from_dict(C.to_dict(cfg))
    assert again == cfg


def test_dotted_overrides_parse_yaml_scalars():
    cfg = C.load_config(None, ["model.dtype=bfloat16", "optim.lr=3e-5", "train.steps=7",
                               "rollout.prompt_buckets=[16, 32]", "train.tensorboard=false"])
    assert cfg.model.dtype == "bfloat16"
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.train.steps == 7
    assert cfg.rollout.prompt_buckets == [16, 32]
    assert cfg.train.tensorboard is False


def test_unknown_key_names_closest():
    with pytest.raises(C.ConfigError, match="did you mean 'optim.lr'"):
        C.load_config(None, ["optim.lrr=1e-5"])
    with pytest.raises(C.ConfigError, match="did you mean 'rollout'"):
        C.load_config(None, ["rollot.n=4"])


def test_wrong_type_and_invalid_value():
    with pytest.raises(C.ConfigError, match="expected an integer"):
        C.load_config(None, ["train.steps=abc"])
    with pytest.raises(C.ConfigError, match="top_p"):
        C.load_config(None, ["rollout.top_p=1.5"])
    with pytest.raises(C.ConfigError, match="did you mean 'bfloat16'"):
        C.load_config(None, ["model.dtype=bfloat"])
    with pytest.raises(C.ConfigError, match="multiple"):
        C.load_config(None, ["train.prompts_per_step=10", "train.minibatch_prompts=4"])


def test_yaml_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 3\n  seed: 1\nloss:\n  name: grpo\n  params: {clip_high: 0.28}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 5\nloss:\n  params: {dual_clip: 3.0}\n")
    data = C.read_yaml(tmp_path / "child.yaml")
    assert data["train"] == {"steps": 5, "seed": 1}
    assert data["loss"]["params"] == {"clip_high": 0.28, "dual_clip": 3.0}
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "nope.yaml")
    # a bare base name that is no file beside the YAML is the built-in preset; a missing file stays an error
    (tmp_path / "mine.yaml").write_text("base: demo\ntrain:\n  steps: 7\n")
    mine = C.load_config(tmp_path / "mine.yaml")
    assert mine.train.steps == 7 and mine.model.path == "demo" and mine.data.task == "arithmetic"
    (tmp_path / "typo.yaml").write_text("base: ./demo.yaml\n")
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "typo.yaml")


def test_yaml_keys_twice_merge_keys_and_unhashable_keys(tmp_path):
    """A key given twice in one mapping is refused; YAML merge keys (`<<: *anchor`, overridden beside) still
    work; an unhashable key is a config error, not a TypeError."""
    (tmp_path / "twice.yaml").write_text("rollout:\n  n: 4\nrollout:\n  temperature: 0.5\n")
    with pytest.raises(C.ConfigError, match=r"invalid YAML: key 'rollout' appears twice in one mapping \(line 3, column 1\)$"):
        C.read_yaml(tmp_path / "twice.yaml")
    (tmp_path / "merge.yaml").write_text("x-shared: &shared {n: 4, temperature: 0.5}\nrollout: {<<: *shared, n: 8}\n")
    assert C.read_yaml(tmp_path / "merge.yaml")["rollout"] == {"n": 8, "temperature": 0.5}
    # an anchor that merges another and is merged itself (PyYAML rewrites merged nodes in place)
    (tmp_path / "nested.yaml").write_text("defaults:\n  base: &b {temperature: 1.0}\n  s: &s {<<: *b, temperature: 0.6}\n"
                                          "rollout: {<<: *s, n: 2}\n")
    assert C.read_yaml(tmp_path / "nested.yaml")["rollout"] == {"temperature": 0.6, "n": 2}
    (tmp_path / "unhashable.yaml").write_text("rollout:\n  ? [1, 2]\n  : 3\n")
    with pytest.raises(C.ConfigError, match=r"unhashable.yaml: invalid YAML: found unhashable key \(line 2, column 5\)$"):
        C.read_yaml(tmp_path / "unhashable.yaml")


def test_docs_table_covers_every_field():
    table = C.docs_table()
    assert "`optim.lr`" in table and "peak learning rate" in table
    assert "`loss.name`" in table


def test_every_paper_preset_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs" / "paper"
    from entrl.methods import METHODS

    files = sorted(p for p in root.rglob("*.yaml") if not p.name.startswith("_"))
    assert len(files) == 39  # 3 models x (9 methods of the paper's comparison + 4 ablations of SENT)
    for f in files:
        cfg = C.load_config(f)
        method = METHODS[f.stem]  # each file is the method of its name: its loss, and its curriculum setting
        assert cfg.loss.name == method.loss
        assert cfg.curriculum.enabled == (method.curriculum != "off"), f
        if cfg.curriculum.enabled:
            assert cfg.curriculum.order == method.curriculum and cfg.curriculum.stages == 2
        assert cfg.train.stage_boundary == "restart"  # the released two-stage recipe
        assert cfg.train.prompts_per_step == 256 and cfg.train.minibatch_prompts == 128
        assert cfg.optim.lr == pytest.approx(1e-6) and cfg.loss.kl_coef == pytest.approx(0.001)
    baselines = {f.stem for f in files if not C.load_config(f).curriculum.enabled}
    assert baselines == {"grpo", "entropy_bonus", "entropy_adv", "high_entropy_mask", "clip_cov", "kl_cov",
                         "sent_token_only"}


def test_loss_name_and_params_validated_at_load():
    with pytest.raises(C.ConfigError, match="sent"):
        C.load_config(None, ["loss.name=snet"])
    with pytest.raises(C.ConfigError, match="rho"):
        C.load_config(None, ["loss.name=sent", "loss.params={rhoo: 0.5}"])
    cfg = C.load_config(None, ["loss.name=kl_cov", "loss.params={kcov: 0.01}"])
    assert cfg.loss.params == {"kcov": 0.01}


@pytest.mark.parametrize("value,message", [
    ("nan", "loss.params.beta=nan must be a finite number"),  # YAML 1.1 reads these as strings
    ("1e999", "loss.params.beta=inf must be a finite number"),
    (".inf", "loss.params.beta=inf must be a finite number"),
    ("-1", "loss.params.beta=-1 must be >= 0"),
    ("lots", "loss.params.beta='lots' must be a Python number"),
])
def test_loss_params_read_numbers_as_float_fields_do(value, message):
    with pytest.raises(C.ConfigError, match=f"^{re.escape(message)}"):
        C.load_config(None, [f"loss.params.beta={value}"])
    assert C.load_config(None, ["loss.params.beta=1e-3"]).loss.params == {"beta": 0.001}  # not refused as text
    assert C.load_config(None, ["loss.name=grpo", "loss.params.dual_clip=.inf"]).loss.params["dual_clip"] == float("inf")
    with pytest.raises(C.ConfigError, match=r"dual_clip=nan must be > 1"):  # where inf is allowed, NaN is not
        C.load_config(None, ["loss.name=grpo", "loss.params.dual_clip=nan"])


@pytest.mark.parametrize("key,value,needle", [
    ("train.seed", -1, "must be in [0, 2**32)"),
    ("train.seed", 2**63, "must be in [0, 2**32)"),
    ("curriculum.seed", -1, "must be in [0, 2**32)"),
    ("eval.seed", -3, "must be in [0, 2**32)"),
    ("data.arithmetic_seed", -2, "or -1 (= train.seed)"),
    ("warmstart.seed", -2, "or -1 (= train.seed)"),
    ("train.checkpoint_every", -1, "must be >= 0"),
    ("train.log_every", 0, "must be > 0"),
    ("data.arithmetic_train_size", -5, "must be >= 0"),
    ("data.arithmetic_heldout_size", -1, "must be >= 0"),
    ("rollout.prompt_buckets", "[-8, 16]", "rollout.prompt_buckets[0]=-8: must be > 0"),
    ("reward.workers", -1, "must be >= 0"),
    ("reward.workers", 10_000, "at most 256 verification processes"),
])
def test_seeds_and_counts_out_of_range(key, value, needle):
    with pytest.raises(C.ConfigError, match=re.escape(needle)):
        C.load_config(None, [f"{key}={value}"])
    assert C.load_config(None, ["data.arithmetic_seed=-1", "warmstart.seed=-1", "train.checkpoint_every=0"])


def test_resume_changes_refuse_trajectory_settings_and_allow_the_rest():
    started = C.to_dict(C.load_config(None, ["loss.name=sent", "train.steps=2"]))
    _, conflicts = C.resume_changes(started, C.to_dict(C.load_config(None, ["loss.name=grpo", "train.steps=3"])))
    assert conflicts == ["loss.name was 'sent', now 'grpo'"]
    allowed = ["train.steps=3", "train.log_every=5", "train.checkpoint_every=1", "train.eval_every=1",
               "val.data=math500", "eval.n=64", "mesh.data=2", "mesh.fsdp=2", "reward.workers=2", "train.out_dir=x",
               "train.wandb=true", "train.memory_check=false", "model.remat=full", "rollout.slots=64",
               "loss.params.beta=0.1"]  # sent's own preset value: the same hyperparameters
    changed, conflicts = C.resume_changes(started, C.to_dict(C.load_config(None, ["train.steps=2", *allowed])))
    assert conflicts == [] and changed["train.steps"] == (2, 3) and "loss.params.beta" not in changed
    for key, value in (("train.seed", 1), ("optim.lr", 1e-5), ("rollout.n", 4), ("data.max_rows", 9),
                       ("curriculum.stages", 3), ("model.dtype", "bfloat16"), ("train.prompts_per_step", 128),
                       ("loss.params.beta", 0.2), ("reward.correct", 2.0)):
        _, conflicts = C.resume_changes(started, C.to_dict(C.load_config(None, ["train.steps=2", f"{key}={value}"])))
        assert [c.split(" was ")[0] for c in conflicts] == [key]
    _, conflicts = C.resume_changes(started, C.to_dict(C.load_config(None, ["train.steps=2", "warmstart.steps=9",
                                                                            "data.arithmetic_seed=9", "model.lora_alpha=9"])))
    assert conflicts == []  # settings of a warm start, task and adapters this run does not have
    decaying = C.to_dict(C.load_config(None, ["optim.schedule=cosine", "train.steps=2"]))
    _, conflicts = C.resume_changes(decaying, C.to_dict(C.load_config(None, ["optim.schedule=cosine", "train.steps=3"])))
    assert conflicts == ["train.steps was 2, now 3 (optim.schedule=cosine decays the learning rate over train.steps)"]


def _float_keys():
    import typing

    for section in dataclasses.fields(C.RunConfig):
        cls = typing.get_type_hints(C.RunConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (float, list[float]):
                yield f"{section.name}.{f.name}", hints[f.name] is float


@pytest.mark.parametrize("key,scalar", list(_float_keys()))
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_every_float_field_must_be_finite(key, scalar, bad):
    value = bad if scalar else f"[{bad}]"
    with pytest.raises(C.ConfigError, match=rf"^{re.escape(key)}=.*finite"):
        C.load_config(None, [f"{key}={value}"])


def test_stage_boundary_and_its_old_spelling():
    assert C.load_config(None).train.stage_boundary == "continue"
    assert C.load_config(None, ["train.stage_boundary=restart"]).train.stage_boundary == "restart"
    for old, new in ((True, "reset_optimizer"), (False, "continue")):  # old run directories keep loading
        cfg = C.from_dict({"train": {"reset_optimizer_between_stages": old}})
        assert cfg.train.stage_boundary == new
    with pytest.raises(C.ConfigError, match="both given"):
        C.load_config(None, ["train.reset_optimizer_between_stages=true", "train.stage_boundary=restart"])
    with pytest.raises(C.ConfigError, match="continue, reset_optimizer, restart"):
        C.load_config(None, ["train.stage_boundary=new_run"])
    with pytest.raises(C.ConfigError, match="curriculum.order"):
        C.load_config(None, ["curriculum.order=hard_first"])
    with pytest.raises(C.ConfigError, match="curriculum.stages instead"):
        C.load_config(None, ["curriculum.order=random", "curriculum.thresholds=[0.5]"])


def test_val_and_warmstart_sections():
    cfg = C.load_config(None, ["data.task=arithmetic", "train.eval_every=5"])  # the held-out split
    assert cfg.val.data == "" and cfg.val.n == 1 and cfg.val.k == [1] and cfg.val.before_training
    with pytest.raises(C.ConfigError, match="train.eval_every=5 needs an evaluation set.*val.data"):
        C.load_config(None, ["data.task=math", "train.eval_every=5"])
    assert C.load_config(None, ["train.eval_every=5", "val.data=math500"]).val.data == "math500"
    with pytest.raises(C.ConfigError, match=r"val.k=\[1, 8\]"):
        C.load_config(None, ["val.n=4", "val.k=[1, 8]"])
    with pytest.raises(C.ConfigError, match="val.top_p"):
        C.load_config(None, ["val.top_p=0"])
    with pytest.raises(C.ConfigError, match="val.top_k"):
        C.load_config(None, ["val.top_k=-1"])
    # the periodic evaluation samples with val.*'s own settings (as verl's val_kwargs), not the rollout's top-k
    from entrl.sampling import val_batch_prompts, val_settings
    cfg = C.load_config(None, ["rollout.top_k=50", "rollout.top_p=0.9", "rollout.max_new_tokens=100",
                               "rollout.cache_dtype=bfloat16", "val.n=3", "val.top_p=0.6", "val.temperature=0"])
    assert val_settings(cfg) == {"n": 3, "temperature": 0.0, "top_p": 0.6, "top_k": 0, "max_new_tokens": 100,
                                 "cache_dtype": "bfloat16"}
    own = val_settings(C.replace(cfg, **{"val.top_k": 20, "val.max_new_tokens": 40}))
    assert (own["top_k"], own["max_new_tokens"]) == (20, 40)
    # a call decodes as many rows as a rollout call: the step's (or rollout.slots), in whole problems
    assert val_batch_prompts(cfg) == 256 * 8 // 3 == 682  # train.prompts_per_step x rollout.n rows, 3 per problem
    assert val_batch_prompts(C.replace(cfg, **{"rollout.slots": 7})) == 2
    cfg = C.load_config(None, ["data.val_files=bench/aime24.jsonl", "trainer.val_before_train=false",
                               "actor_rollout_ref.rollout.val_kwargs.n=4"])  # verl's names
    assert (cfg.val.data, cfg.val.before_training, cfg.val.n) == ("bench/aime24.jsonl", False, 4)
    with pytest.raises(C.ConfigError, match="model.path=demo and data.task=arithmetic"):
        C.load_config(None, ["warmstart.enabled=true"])
    cfg = C.load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", ["warmstart.enabled=true", "warmstart.steps=10"])
    assert cfg.warmstart.steps == 10 and cfg.warmstart.error_rate == 0.45
    with pytest.raises(C.ConfigError, match="warmstart.error_rate"):
        C.load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", ["warmstart.error_rate=1.5"])


def test_reward_and_visibility_keys(tmp_path):
    """reward.fn takes one spec or a list (its form checked here, the import at train start); weights one per
    term; train.progress reads YAML's on/off booleans; TRL / verl names for the run name and reward weights."""
    assert C.load_config().reward.fn == ["entrl.rewards:math_reward"]
    one = C.load_config(None, ["reward.fn=my_rewards.py:brevity"])
    assert one.reward.fn == ["my_rewards.py:brevity"] and C.from_dict(C.to_dict(one)) == one
    two = C.load_config(None, ["reward.fn=[entrl.rewards:math_reward, pkg.mod:fmt]", "reward_weights=[1, -0.5]"])
    assert two.reward.fn == ["entrl.rewards:math_reward", "pkg.mod:fmt"] and two.reward.weights == [1.0, -0.5]
    for bad, needle in ((["reward.fn=[]"], "empty"), (["reward.fn=entrl.rewards"], "package.module:function"),
                        (["reward.fn=[a:b, a:b]"], "twice"), (["reward.weights=[1, 2]"], "2 weights for the 1"),
                        (["reward.weights=[0]"], "all 0"), (["train.progress=sometimes"], "train.progress")):
        with pytest.raises(C.ConfigError, match=needle):
            C.load_config(None, bad)
    (tmp_path / "c.yaml").write_text("train:\n  progress: on\n  log_samples_every: 5\n")
    assert C.load_config(tmp_path / "c.yaml").train.progress == "on"
    assert C.load_config(None, ["train.progress=off"]).train.progress == "off"
    names = C.load_config(None, ["run_name=mine", "trainer.project_name=proj"]).train
    assert (names.run_name, names.wandb_project) == ("mine", "proj")
    assert C.load_config(None, ["trainer.experiment_name=exp"]).train.run_name == "exp"


# Config fields read other than as `<expr>.<section>.<field>`, `<alias>.<field>` (alias = `<expr>.<section>`, or a
# parameter annotated with the section's class). Add `"section.field": "where and why"` here only for a reader this
# scan cannot see; a field that nothing reads is removed instead (with a RENAMED note in config.py).
READ_ELSEWHERE: dict[str, str] = {
    # resolved against the loss's own scope in config.py (the scan skips it), used by the update and its checks
    "loss.scope": "config.selection_scope -> rl.trainer.step_settings, build.check_batch_layout",
    "loss.scope_seqs": "config.selection_scope -> rl.trainer.step_settings, build.check_batch_layout",
}


def _config_reads() -> set[tuple[str, str]]:
    """(section, field) pairs that some module of entrl other than config.py reads (an AST scan)."""
    import ast
    import typing
    from pathlib import Path

    sections = {s.name: typing.get_type_hints(C.RunConfig)[s.name] for s in dataclasses.fields(C.RunConfig)}
    by_class = {cls.__name__: name for name, cls in sections.items()}
    reads = set()
    for path in (Path(C.__file__).parent).rglob("*.py"):
        if path == Path(C.__file__):
            continue
        tree = ast.parse(path.read_text())
        alias = {}  # names bound to a section in this module: `v = cfg.val`, `cfg, v = ..., cfg.val`, `d: DataSection`
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                             and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                    for t, v in pairs:
                        if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr in sections:
                            alias[t.id] = v.attr
            elif isinstance(node, ast.arg) and node.annotation is not None:
                name = ast.unparse(node.annotation).strip("'\"").split(".")[-1]
                if name in by_class:
                    alias[node.arg] = by_class[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Attribute) and node.value.attr in sections:
                    reads.add((node.value.attr, node.attr))
                elif isinstance(node.value, ast.Name) and node.value.id in alias:
                    reads.add((alias[node.value.id], node.attr))
    return reads


def test_every_config_field_has_a_reader():
    """A key that nothing reads is a setting that silently does nothing (as `train.log_every` once was)."""
    import typing

    reads = _config_reads()
    unread = [f"{s.name}.{f.name}" for s in dataclasses.fields(C.RunConfig)
              for f in dataclasses.fields(typing.get_type_hints(C.RunConfig)[s.name])
              if (s.name, f.name) not in reads and f"{s.name}.{f.name}" not in READ_ELSEWHERE]
    assert not unread, f"config fields no module of entrl reads: {unread}"
    assert ("train", "log_every") in reads and ("val", "entropy") in reads  # the scan sees direct and aliased reads
