"""The columns of the paper's comparison that `entrl ablate` trains: a loss plus whether (and in which order)
the semantic-entropy curriculum is used. JAX-free, like `entrl.rl.loss_specs` it derives from: the CLI's
help lists the methods before anything imports JAX (see `entrl.ablate` for how a method becomes a run).
"""

from __future__ import annotations

import dataclasses

from entrl.rl.loss_specs import LOSSES


@dataclasses.dataclass(frozen=True)
class Method:
    """One column of the comparison."""

    loss: str  # loss.name
    curriculum: str  # "off" (shuffled epochs) or a curriculum.order
    label: str  # what the column is, in the paper's words
    overrides: tuple[str, ...] = ()  # further keys the method sets


METHODS: dict[str, Method] = {
    # The paper's baselines: its GRPO setup on the unsorted training set.
    "grpo": Method("grpo", "off", "GRPO"),
    "entropy_bonus": Method("entropy_bonus", "off", "GRPO w/ En (entropy bonus)"),
    "entropy_adv": Method("entropy_adv", "off", "GRPO w/ Adv (Cheng et al. 2025)"),
    "high_entropy_mask": Method("high_entropy_mask", "off", "GRPO w/ Mask (Wang et al. 2025)"),
    "clip_cov": Method("clip_cov", "off", "GRPO w/ Clip (Clip-Cov, Cui et al. 2025)"),
    "kl_cov": Method("kl_cov", "off", "GRPO w/ Cov (KL-Cov, Cui et al. 2025)"),
    "kl_cov_verl": Method("kl_cov_verl", "off", "GRPO w/ Cov, verl's defaults"),
    # SENT: the token loss on the SE curriculum (low -> high).
    "high_en": Method("high_en", "low_to_high", "SENT w/ High_En (token term on high-entropy tokens)"),
    "sent": Method("sent", "low_to_high", "SENT (paper reading)"),
    "sent_released": Method("sent_released", "low_to_high", "SENT (released code)"),
    # Component ablations of SENT.
    "sent_token_only": Method("sent", "off", "SENT token loss only (no curriculum)"),
    "sent_curriculum_only": Method("grpo", "low_to_high", "SE curriculum only (GRPO loss)"),
    "sent_high_to_low": Method("sent", "high_to_low", "SENT, curriculum high -> low SE"),
    "sent_random_order": Method("sent", "random", "SENT, curriculum of random stages"),
}
# A declared loss without an entry above is a method of its own name, trained as the baselines are (no
# curriculum), so a new loss can be ablated without touching this file.
for _name, _spec in LOSSES.items():
    METHODS.setdefault(_name, Method(_name, "off", _spec.column))
# Every loss of the paper's comparison with its own setting (the variants, e.g. kl_cov_verl, only on request).
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if name == m.loss and not LOSSES[name].variant_of)
