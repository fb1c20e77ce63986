"""Training: the driver (plan, MLflow run, TorchTrainer), the worker's step loop in parts, the DeepSpeed engine."""
