"""Family `nar`: next-neighbour AR over token ids (raygen/models/nar.py)."""

from __future__ import annotations

from dataclasses import dataclass

from raygen.families import register
from raygen.families.base import Family
from raygen.options import option


@dataclass
class NARKnobs:
    cfg_interval: int = option(-1, min=-1, help="guide only the first N decoding passes (-1 = every pass)")


class NAR(Family):
    name = "nar"
    knobs = NARKnobs


register(NAR())
