"""Thin jobs: parse arguments, resolve the config, make one platform call, say where results went."""
