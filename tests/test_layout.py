"""House rules that keep the parts apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "deepspeed", "mlflow"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_are_pure_pytorch():
    files = sorted((ROOT / "raygen" / "models").rglob("*.py"))
    assert files, "raygen/models has no Python files"
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_never_call_cuda():
    for f in (ROOT / "raygen" / "models").rglob("*.py"):
        assert ".cuda()" not in f.read_text(), f"{f} calls .cuda(); take a device instead"


def test_no_top_level_platform_package():
    # A top-level `platform` package would shadow the standard library module.
    assert not (ROOT / "platform").exists()
    import platform

    assert hasattr(platform, "python_version")


def test_readme_opens_with_the_two_commands():
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    fenced = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert fenced == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
