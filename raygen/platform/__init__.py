"""Everything that touches ray, deepspeed, mlflow and pyarrow."""
