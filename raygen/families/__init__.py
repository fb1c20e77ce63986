"""Family plugins: the one place a model family tells the platform what it needs.

Each module here defines one `Family` subclass and registers it. A family from outside raygen
registers the same way from its own module; name that module in RAYGEN_FAMILIES (comma-separated)
so every process, Ray workers included, imports it:

    RAYGEN_FAMILIES=mypkg.family raygen train model.family=mine ...

The platform finds a family by name with `get`, and the module that registered it with
`module_of` (so a worker that builds the model imports the same plugin).
"""

from __future__ import annotations

import importlib
import os

from raygen.families.base import DATA_KINDS, DataInfo, Family, NoKnobs, PaperRow, Prepared

FAMILIES: dict[str, Family] = {}
_MODULES: dict[str, str] = {}
BUILTIN = ("raygen.families.ar", "raygen.families.arpg", "raygen.families.nar", "raygen.families.ctf",
           "raygen.families.emigm", "raygen.families.vae", "raygen.families.d2it")


def register(family: Family) -> Family:
    """Add a family plugin; a second plugin under the same name raises ValueError."""
    from raygen.models.registry import family_spec

    name = family.name
    if name in FAMILIES and type(FAMILIES[name]) is not type(family):
        raise ValueError(f"a family named '{name}' is already registered ({type(FAMILIES[name]).__name__})")
    if family.data_kind not in DATA_KINDS:
        raise ValueError(f"family '{name}': data_kind must be one of {', '.join(DATA_KINDS)}, got {family.data_kind!r}")
    family_spec(name)  # its models are in the model registry
    FAMILIES[name] = family
    _MODULES[name] = type(family).__module__
    return family


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in plugins, those named in RAYGEN_FAMILIES, and `modules`."""
    extra = [m.strip() for m in os.environ.get("RAYGEN_FAMILIES", "").split(",") if m.strip()]
    for module in (*BUILTIN, *extra, *modules):
        importlib.import_module(module)


def get(name: str) -> Family:
    """The plugin of family `name` (case-insensitive); unknown names list the known ones."""
    from raygen.errors import ConfigError

    family = FAMILIES.get(str(name).lower())
    if family is None:
        raise ConfigError(f"unknown model family '{name}'; known: {', '.join(sorted(FAMILIES))}")
    return family


def module_of(name: str) -> str:
    """The module that registered family `name` (imported again on Ray workers)."""
    return _MODULES[get(name).name]


def all_families() -> list[Family]:
    return [FAMILIES[n] for n in sorted(FAMILIES)]


load_plugins()

__all__ = ["DataInfo", "Family", "NoKnobs", "PaperRow", "Prepared", "FAMILIES", "register", "get", "module_of",
           "all_families", "load_plugins"]
