"""Family `arpg`: randomized parallel AR over token ids (raygen/models/arpg.py), with editing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from raygen.families import register
from raygen.families.base import Family
from raygen.options import option


@dataclass
class ARPGKnobs:
    order: Literal["random", "raster", "spiral-in", "spiral-out", "z-curve", "alternate"] = option(
        "random", help="generation order: random draws one permutation per sample, the others scan the grid")
    schedule: Literal["arccos", "cosine"] = option("arccos", help="how many tokens each decoding step reveals")
    cfg_schedule: Literal["linear", "constant"] = option("linear", help="guidance ramp over the decoding steps")


class ARPG(Family):
    name = "arpg"
    knobs = ARPGKnobs

    def can_edit(self, meta: dict[str, Any]) -> bool:
        return True


register(ARPG())
