"""One declaration per policy loss: its name, hyperparameters (preset value and allowed range), whether it
reads the token entropies, and the line the README's loss table shows.

Design decisions:
- This module imports neither jax nor anything of entrl, so `entrl.config` validates `loss.name` and
  `loss.params` from it when a config is built, before anything touches a device, and the CLI, the
  README table and the tests derive their lists of losses from it.
- A loss is `LossSpec` here plus its function in `entrl.rl.losses` (registered under the spec's name
  with `@loss_fn("name")`; importing `entrl.rl.losses` fails if a spec has no function or a function
  no spec) plus its NumPy reference in tests/test_losses.py (a test fails if one is missing).
- A hyperparameter's range belongs to its name (`clip_low` means the same in every loss), so the rules
  are one table (`RULES`) and a spec lists only its preset values; a loss whose hyperparameters must
  also hold together (`cov_lb < cov_ub`) says so in `check`.
- Aggregation modes and KL estimators are named here for the same reason as the losses: the config
  validates them without importing the functions that implement them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


class LossParamError(ValueError):
    """A loss name or hyperparameter that is not valid (`entrl.config` re-raises it as a ConfigError)."""


@dataclass(frozen=True)
class Rule:
    """What a hyperparameter may be: a number satisfying `ok` (said in words by `need`), or one of `choices`.
    Numbers are finite unless `infinite` (where an infinity means something: no dual clip, no bound)."""

    need: str  # what the value must be, in words (the error message)
    ok: Callable[[float], bool] | None = None  # predicate on the float value (numbers)
    choices: tuple[str, ...] = ()  # allowed strings (string hyperparameters)
    infinite: bool = False  # `ok` may accept an infinity (NaN never)


_FRAC = Rule("in (0, 1]", lambda v: 0 < v <= 1)
_NONNEG = Rule(">= 0", lambda v: v >= 0)

RULES: dict[str, Rule] = {
    "clip_low": Rule("in [0, 1] (1: no lower clip, as Clip-Cov's recipe)", lambda v: 0 <= v <= 1),
    "clip_high": _NONNEG,
    "dual_clip": Rule("> 1 (.inf turns the dual clip off)", lambda v: v > 1, infinite=True),
    "rho": _FRAC, "kcov": _FRAC, "ratio": _FRAC, "top_frac": _FRAC,
    "beta": _NONNEG, "base_mult": _NONNEG, "high_mult": _NONNEG, "low_mult": _NONNEG,
    "coef": _NONNEG, "alpha": _NONNEG,
    "kappa": Rule("> 0", lambda v: v > 0),
    "cov_lb": Rule("a number (may be -inf)", lambda v: not math.isinf(v) or v < 0, infinite=True),
    "cov_ub": Rule("a number (may be +inf)", lambda v: not math.isinf(v) or v > 0, infinite=True),
    "pg": Rule("unclipped | clip", choices=("unclipped", "clip")),
}


def _cov_bounds(hp: Mapping) -> str | None:
    return None if hp["cov_lb"] < hp["cov_ub"] else f"cov_lb={hp['cov_lb']} must be < cov_ub={hp['cov_ub']}"


@dataclass(frozen=True)
class LossSpec:
    """Everything about a loss except its math (which is its function in `entrl.rl.losses`)."""

    name: str  # loss.name
    preset: Mapping[str, float | str]  # every hyperparameter with its default (loss.params overrides them)
    needs_entropy: bool  # reads the token entropies (ranks, masks or shapes with them)
    column: str  # the paper's comparison column it reproduces
    summary: str  # what it does, one line (the README's loss table)
    variant_of: str = ""  # the loss it re-parameterises (not a method of the comparison of its own)
    scope: str = "global"  # its token-selection scope under loss.scope=auto: global | microbatch
    scope_seqs: int = 0  # under scope=microbatch: sequences per data shard in one scope (0 = the memory micro-batch)
    check: Callable[[Mapping], str | None] | None = field(default=None, compare=False)  # joint constraint: error or None


# GRPO's clipped surrogate: eps = 0.2 both sides (DAPO clip-higher: clip_high = 0.28),
# dual clip 3.0 for negative advantages (.inf turns it off).
_CLIP = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0}
# SENT's token term. pg = "unclipped" (-A r, as released) or "clip" (the GRPO term, using _CLIP).
_SENT = {"rho": 0.8, "kcov": 0.02, "beta": 0.1, "base_mult": 1.0, "high_mult": 2.0, "low_mult": 0.5,
         "pg": "unclipped", **_CLIP}

_SPECS = (
    LossSpec("grpo", _CLIP, needs_entropy=False, column="GRPO", summary="PPO clip (eps_lo / eps_hi, dual clip 3)"),
    LossSpec("sent", _SENT, needs_entropy=True, column="SENT (paper reading, default)",
             summary="unclipped `-A r` + `beta * w_t * |logp - old|` on the 80% lowest-entropy tokens, x2 on their "
                     "top-2% covariance, x0.5 on the bottom 2%"),
    # The release selects tokens in each GPU's 4-sequence micro-batch (ppo_micro_batch_size_per_gpu=4):
    # scopes of 4 sequences per data shard, whatever micro-batch the memory plan uses.
    LossSpec("sent_released", {**_SENT, "base_mult": 0.0, "kcov": 0.0002}, needs_entropy=True,
             column="SENT (released code, bug fixed)", variant_of="sent", scope="microbatch", scope_seqs=4,
             summary="as `sent` with `base_mult=0`, `kcov=0.0002`, selection per 4 sequences of a shard"),
    LossSpec("entropy_bonus", {"coef": 0.001, **_CLIP}, needs_entropy=True, column="w/ En",
             summary="GRPO − 0.001 · mean entropy (gradient through H)"),
    LossSpec("entropy_adv", {"alpha": 0.4, "kappa": 2.0, **_CLIP}, needs_entropy=True, column="w/ Adv",
             summary="`A + min(0.4 H, |A|/2)`"),
    LossSpec("high_entropy_mask", {"top_frac": 0.2, **_CLIP}, needs_entropy=True, column="w/ Mask",
             summary="policy gradient only on the top-20% entropy tokens"),
    # Cui et al. 2025's recipe (verl recipe/entropy/*_clip_cov.sh): clip ratio 1 / 1, i.e. r clipped to
    # [0, 2], which almost never binds: the covariance-selected detachment is the only constraint.
    LossSpec("clip_cov", {"clip_low": 1.0, "clip_high": 1.0, "ratio": 0.0002, "cov_lb": 1.0, "cov_ub": 5.0},
             needs_entropy=False, column="w/ Clip", check=_cov_bounds,
             summary="zero the gradient of a random 0.02% of tokens with covariance in (1, 5); PPO clip ratio "
                     "1 / 1 (r in [0, 2]), Cui et al.'s recipe"),
    LossSpec("kl_cov", {"kcov": 0.002, "beta": 1.0}, needs_entropy=False, column="w/ Cov",
             summary="`beta |logp - old|` on the top-k covariance tokens (k=0.002, beta=1; Cui et al.'s paper)"),
    LossSpec("kl_cov_verl", {"kcov": 0.0002, "beta": 0.1}, needs_entropy=False, column="w/ Cov (verl defaults)",
             variant_of="kl_cov", summary="as `kl_cov` with verl's yaml defaults k=0.0002, beta=0.1"),
    LossSpec("high_en", _SENT, needs_entropy=True, column="w/ High_En",
             summary="SENT's term on the top-20% *highest*-entropy tokens"),
)
LOSSES: dict[str, LossSpec] = {s.name: s for s in _SPECS}
PRESETS: dict[str, dict[str, float | str]] = {s.name: dict(s.preset) for s in _SPECS}


def validate_loss_params(name: str, params: Mapping) -> None:
    """Check a loss name and overrides of its preset hyperparameters; raise LossParamError."""
    if name not in LOSSES:
        raise LossParamError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    spec = LOSSES[name]
    for key, value in params.items():
        if key not in spec.preset:
            raise LossParamError(f"loss.params.{key}: loss {name!r} has no hyperparameter {key!r}; valid: "
                                 f"{', '.join(spec.preset)}")
        rule, what = RULES[key], f"loss.params.{key}={value!r}"
        if rule.choices:
            if value not in rule.choices:
                raise LossParamError(f"{what} must be one of {', '.join(rule.choices)} (loss {name!r})")
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LossParamError(f"{what} must be a Python number (hyperparameters are static, not arrays)")
        if not math.isfinite(value) and not rule.infinite:
            raise LossParamError(f"{what} must be a finite number (loss {name!r})")
        if math.isnan(value) or not rule.ok(float(value)):
            raise LossParamError(f"{what} must be {rule.need} (loss {name!r})")
    problem = spec.check({**spec.preset, **params}) if spec.check else None
    if problem:
        raise LossParamError(f"loss {name!r}: {problem}")


def resolve_params(name: str, params: Mapping) -> dict:
    """The preset of `name` with `params` overriding it, validated (numbers as float)."""
    validate_loss_params(name, params)
    return {k: (v if isinstance(v, str) else float(v)) for k, v in {**LOSSES[name].preset, **params}.items()}


def markdown_table() -> str:
    """The README's table of losses (tests/test_readme.py keeps the README equal to it)."""
    lines = ["| `loss.name` | paper column | what it does |", "|---|---|---|"]
    lines += [f"| `{s.name}` | {s.column} | {s.summary.replace('|', chr(92) + '|')} |" for s in _SPECS]
    return "\n".join(lines)
