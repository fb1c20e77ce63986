"""Family `ar`: LlamaGen's raster-order GPT over token ids (raygen/models/ar.py). Nothing beyond
the defaults: ids in, ids out, no knobs."""

from __future__ import annotations

from raygen.families import register
from raygen.families.base import Family


class AR(Family):
    name = "ar"


register(AR())
