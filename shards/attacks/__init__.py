"""The attack registry. Adding an attack is one file: define a subclass of ``Attack`` decorated
with ``@register("name")`` and import the module below.
"""
from shards.attacks.base import ATTACKS, Attack, build_attack, register
from shards.attacks import badnets, blended, ftrojan, low_frequency, sig  # noqa: F401  (registers the attacks)

__all__ = ["ATTACKS", "Attack", "build_attack", "register"]
