"""Byzantine attacks beside the aggregators they attack (ByzFL's ``attacks/`` next to ``aggregators/``).

Model poisoning (applied at the server, where every update meets): :mod:`.model` (crash, sign flip,
reversed, Gaussian, uniform, inf/NaN, ALIE, FOE/IPM), :mod:`.adaptive` (line-searched ALIE and FOE),
:mod:`.mimic`; :mod:`.round` applies an attack to a round's updates and extras and :mod:`.adversary`
holds the run's threat model (who is Byzantine, seeds, checkpoints). Data poisoning (label flip,
noisy data) acts in the client and stays in :mod:`clients.byzantine`; ``ATTACKS`` names both kinds
(the names of ``conf/attack/*.yaml``).
"""

from __future__ import annotations

from typing import Any

from flagstaff.clients.byzantine import Attack, DataAttack, LabelFlip, NoAttack, NoisyData
from flagstaff.strategies.attacks.adaptive import (
    ALIEAdaptive,
    FOEAdaptive,
    FOEModelAdaptive,
    line_search,
)
from flagstaff.strategies.attacks.adversary import Adversary
from flagstaff.strategies.attacks.mimic import Mimic
from flagstaff.strategies.attacks.model import (
    ALIE,
    FOE,
    Crash,
    Gaussian,
    InfAttack,
    ModelAttack,
    NaNAttack,
    Reversed,
    SignFlip,
    Uniform,
    alie_z,
)
from flagstaff.strategies.attacks.round import (
    AttackedRound,
    adaptive_probe,
    apply_model_attack,
    attack_round,
)

__all__ = [
    "ATTACKS",
    "ALIE",
    "ALIEAdaptive",
    "Adversary",
    "Attack",
    "AttackedRound",
    "Crash",
    "DataAttack",
    "FOE",
    "FOEAdaptive",
    "FOEModelAdaptive",
    "Gaussian",
    "InfAttack",
    "LabelFlip",
    "Mimic",
    "ModelAttack",
    "NaNAttack",
    "NoAttack",
    "NoisyData",
    "Reversed",
    "SignFlip",
    "Uniform",
    "adaptive_probe",
    "alie_z",
    "apply_model_attack",
    "attack_round",
    "build_attack",
    "line_search",
]

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "sign_flip": SignFlip,
    "reversed": Reversed,
    "label_flip": LabelFlip,
    "noisy_data": NoisyData,
    "gaussian": Gaussian,
    "uniform": Uniform,
    "alie": ALIE,
    "alie_adaptive": ALIEAdaptive,
    "foe": FOE,
    "ipm": FOE,  # inner-product manipulation: the same attack
    "foe_adaptive": FOEAdaptive,
    "ipm_adaptive": FOEAdaptive,
    "mimic": Mimic,
    "inf_vector": InfAttack,  # not "inf": Hydra parses attack=inf as a float
    "nan_vector": NaNAttack,
    "crash": Crash,
}


def build_attack(name: str, f: int = 0, **kwargs: Any) -> Attack:
    """Construct the attack registered as ``name`` with f Byzantine clients and its settings."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None
    return cls(f=f, **kwargs)
