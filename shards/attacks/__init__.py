"""The attack registry. Adding an attack is one file: define a subclass of ``Attack`` decorated
with ``@register("name")`` and import the module below.
"""
from shards.attacks.base import ATTACKS, Attack, AttackContext, build_attack, register
from shards.attacks import (  # noqa: F401  (importing a module registers its attack)
    badnets, blended, custom, ftrojan, issba, label_consistent, low_frequency, refool, sig, trojan, wanet)

__all__ = ["ATTACKS", "Attack", "AttackContext", "build_attack", "register"]
