"""Pure-PyTorch models: the generator families, shared layers and tokenizers.

Nothing under raygen/models imports ray, deepspeed or mlflow, moves itself to a GPU by name or reads a rank
(tests/test_layout.py enforces it), so every model runs and is tested on one CPU.
"""

from raygen.models.base import FamilySpec, GenerativeModel, ModelConfig
from raygen.models.registry import (
    MODEL_REGISTRY,
    PAPER_PARAMS,
    build_model,
    family_spec,
    model_config,
    register_family,
)

__all__ = [
    "FamilySpec",
    "GenerativeModel",
    "ModelConfig",
    "MODEL_REGISTRY",
    "PAPER_PARAMS",
    "build_model",
    "family_spec",
    "model_config",
    "register_family",
]
