"""Pure-PyTorch models: the generator families, shared layers and tokenizers.

Nothing under raygen/models imports ray, deepspeed or mlflow, moves itself to a GPU by name or reads a rank
(tests/test_layout.py enforces it), so every model runs and is tested on one CPU.
"""
