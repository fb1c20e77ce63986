"""`raygen models import`: a released checkpoint -> a raygen export, registered in MLflow.

Two kinds of file come in through the same command:

- **a generator** of a family whose paper released weights (the family's `FamilySpec` says where
  a checkpoint keeps them, which config fields their shapes fix, and how its keys map onto
  raygen's). The import reads the file with `weights_only=True`, picks the state dict (an EMA
  entry before the raw one), reads the architecture from its shapes, matches it to a named size,
  maps and checks every key and shape against the model raygen builds, and writes the same
  `model/` export a training run logs: config.json (family, size, architecture, the codec that
  decodes its tokens, classes, sampling defaults) and model.pt.
- **a codec's weights** (`raygen models import vq FILE`, `... kl FILE`): the codec is built from
  its config section with the file as its checkpoint (its own strict loader checks every key),
  and the export holds the checked state dict in the official layout with the architecture in
  config.json; `tokenizer.<codec>.checkpoint=models:/NAME@ALIAS` then tokenizes with it.

The export is logged to an MLflow run of its own (params: family, size, file, sha256; tags
`raygen.import.*`) and registered as a new version of NAME; the version carries the file's
sha256 (`raygen.import.sha256`). Bad input is one line before anything is written: a file
that is not a checkpoint, a pickle `weights_only` refuses, another family, another size (the
first mismatched keys and the size the file implies), a tokenizer that cannot decode it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygen import families
from raygen.config import Config
from raygen.errors import ConfigError, UserError
from raygen.models.registry import build_model, family_spec, size_name
from raygen.models.tokenizers.base import CODEC_EXPORT

IMPORT_TAG = "raygen.import"  # tag prefix of import runs and their model versions
DATA_FIELDS = ("vocab_size", "num_classes", "grid_size", "token_dim")  # what the data decides, not the size


@dataclass(frozen=True)
class Imported:
    """What `import_checkpoint` registered."""

    name: str
    version: int
    run_id: str
    what: str  # "FAMILY SIZE (N parameters)" or "CODEC tokenizer (N values)"
    entry: str | None  # the checkpoint entry the weights came from ("model_ema", "model", ...)
    sha256: str

    @property
    def reference(self) -> str:
        return f"models:/{self.name}/{self.version}"


def importable() -> list[str]:
    """Family and codec names `raygen models import` accepts."""
    from raygen.models.tokenizers import CODECS

    fams = [f.name for f in families.all_families() if family_spec(f.name).from_official is not None]
    return sorted(fams) + sorted(n for n, c in CODECS.items() if c.importable)


# --- reading a file --------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of a local file (training args saved beside the weights as an
    argparse.Namespace are allowed); anything else is one UserError line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint file '{path}' not found (raygen never downloads weights: give a local file)")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            if f.read(1) != b"\x80":  # a legacy torch.save file is a pickle (protocol 2+)
                raise UserError(f"'{path}' is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))  # legacy: no mmap
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = next((line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line), lines[0])
        raise UserError(f"'{path}' does not load with weights_only=True (only tensors and plain containers are "
                        f"read, never code): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"'{path}' is not a PyTorch checkpoint: {first}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def state_dict_of(ckpt: dict[str, Any], keys: tuple[str, ...], path: str | Path
                  ) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict under the first of `keys` the checkpoint has, or the checkpoint itself when it
    is a bare state dict; (state, entry name or None)."""
    for key in keys:
        if _is_state_dict(ckpt.get(key)):
            return ckpt[key], key
    if _is_state_dict(ckpt):
        return ckpt, None
    raise UserError(f"'{path}' holds no state dict (looked under {', '.join(keys)} and at its top level; "
                    f"it has {', '.join(sorted(map(str, ckpt))[:6]) or 'nothing'})")


# --- generators ------------------------------------------------------------------------------


def _fields_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def sizes_matching(family: str, read: dict[str, Any]) -> list[str]:
    """The family's named sizes whose config has every value the checkpoint's shapes fix
    (fields the data decides, such as vocabulary, classes and grid, are not compared)."""
    out = []
    for name, cfg in family_spec(family).sizes.items():
        if all(getattr(cfg, k, None) == v for k, v in read.items() if k not in DATA_FIELDS):
            out.append(name)
    return out


def _choose_size(family: str, read: dict[str, Any], asked: str | None, path: str,
                 state: dict[str, torch.Tensor]) -> str:
    """The size the file is: the named size its shapes match, or `asked`. `asked` gives the fields
    the weights do not fix (heads, grid); a file whose shapes match another named size is refused."""
    shaped = {k: v for k, v in read.items() if k not in DATA_FIELDS}
    fits = sizes_matching(family, read)
    if asked is None:
        if not fits:
            other = looks_like(state, but=family)
            if other:
                raise UserError(f"'{path}' matches no named size of family {family}: its layout is {other}'s")
            raise UserError(f"'{path}' is a {family} checkpoint with {_fields_text(shaped)}, which no named size "
                            f"of {family} has ({', '.join(family_spec(family).sizes)}): pass --size for the fields "
                            "its shapes do not fix (heads), or model.arch.KEY=VALUE")
        return fits[0]
    try:
        asked = size_name(family, asked)
    except ValueError as e:
        raise UserError(str(e)) from None
    if fits and asked not in fits:
        base = family_spec(family).sizes[asked]
        ours = {k: getattr(base, k, None) for k in shaped}
        raise UserError(f"'{path}' is {family} {fits[0]} ({_fields_text(shaped)}); {family} {asked} has "
                        f"{_fields_text(ours)}")
    return asked


def looks_like(state: dict[str, torch.Tensor], but: str) -> str | None:
    """'FAMILY SIZE' of another importable family whose layout takes this state dict exactly
    (keys and shapes, at a named size), or None: what to tell a user who named the wrong family."""
    for family in families.all_families():
        spec = family_spec(family.name)
        if family.name == but or spec.from_official is None:
            continue
        try:
            read = spec.official_arch(state)
            for size in sizes_matching(family.name, read):
                with torch.device("meta"):
                    model = build_model(family.name, size, **read)
                want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                mapped = spec.from_official(state, model.config)
                if want == {k: tuple(v.shape) for k, v in mapped.items()}:
                    return f"{family.name} {size}"
        except (KeyError, IndexError, ValueError, RuntimeError):
            continue
    return None


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    """One UserError naming the first missing, unexpected and mis-shaped keys."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shaped = [k for k in want if k in got and got[k] != want[k]]
    if missing or extra or shaped:
        shown = ([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in extra[:2]]
                 + [f"{k} is {got[k]}, {what} has {want[k]}" for k in shaped[:2]])
        other = looks_like(state, but=what.split()[0])
        raise UserError(f"'{path}' does not fit {what}: {len(missing)} missing, {len(extra)} unexpected, "
                        f"{len(shaped)} mis-shaped keys ({'; '.join(shown)})"
                        + (f"; its layout is {other}'s" if other else ""))


def _codec_for(cfg: Config, data_dir: str | None, family: families.Family, grid: int | None) -> dict[str, Any]:
    """What decodes the model's outputs: a data set's manifest (--data), or the codec the config
    names, built here (its weights resolved, models:/ included). -> the export's data fields."""
    from raygen.platform.data import shards
    from raygen.platform.data.tokenize import column_of, resolve_weights

    if data_dir:
        m = shards.read_manifest(data_dir)
        info = shards.data_info(m)
        family.check_data(info, f"the data set {data_dir}")
        return {"tokenizer": m["tokenizer"], "info": info, "column": shards.data_column(m).to_json(),
                "column_name": shards.data_column(m).name, "class_names": m.get("class_names"),
                "source": m["source"]["name"], "dir": str(Path(data_dir).resolve())}
    from raygen.models.tokenizers import CODECS

    name = cfg.tokenizer.name
    codec = CODECS[name]
    if codec.kind != family.data_kind:
        raise ConfigError(f"tokenizer.name={name} makes {codec.kind}; family {family.name} reads {family.data_kind}: "
                          "name its codec (tokenizer.name=... and its checkpoint) or give --data DIR")
    section, registry = resolve_weights(cfg)
    try:
        down = codec.downsample_of(section)
        size = cfg.data.image_size or codec.image_size_of(section) or (grid or 16) * down
        tok = codec.from_config(section, image_size=size, channels=cfg.data.channels or 3)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer.{name}: {str(e).splitlines()[0]}") from None
    col = column_of(tok, cfg.tokenizer.latent_dtype)
    info = families.DataInfo(kind=tok.kind, column=col.name, grid=tuple(tok.grid), num_classes=0,
                             vocab_size=getattr(tok, "vocab_size", None) if tok.kind == "ids" else None,
                             token_dim=tok.latent_dim if tok.kind == "latents" else None)
    spec = {**tok.spec(), "fingerprint": tok.fingerprint(), **({"registry": registry} if registry else {})}
    return {"tokenizer": spec, "info": info, "column": col.to_json(), "column_name": col.name,
            "class_names": None, "source": None, "dir": None}


def _agree(read: dict[str, Any], data: dict[str, Any], arch: dict[str, Any], path: str, where: str) -> None:
    for key, value in data.items():
        if key in read and read[key] != value:
            raise UserError(f"'{path}' has {key}={read[key]}; {where} gives {key}={value}")
    for key, value in arch.items():
        if key in read and read[key] != value:
            raise UserError(f"'{path}' has {key}={read[key]}; model.arch.{key}={value} says otherwise")


def import_generator(cfg: Config, family_name: str, path: str, *, size: str | None, data_dir: str | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, str | None]:
    """Read, map and check a released generator checkpoint -> (state dict, export meta, a short
    description, the checkpoint entry it came from). Writes nothing."""
    family = families.get(family_name)
    spec = family_spec(family.name)
    if spec.from_official is None:
        raise UserError(f"family {family.name} has no released weights to import (its paper published none); "
                        f"importable: {', '.join(importable())}")
    ckpt = read_checkpoint(path)
    state, entry = state_dict_of(ckpt, spec.official_keys, path)
    try:
        read = spec.official_arch(state)
    except (KeyError, IndexError, ValueError) as e:
        reason = f"no {e} in its state dict" if isinstance(e, KeyError) else str(e).splitlines()[0]
        other = looks_like(state, but=family.name)
        raise UserError(f"'{path}' is not an official {family.name} checkpoint ({reason}; it has e.g. "
                        f"{', '.join(list(state)[:3])})" + (f"; its layout is {other}'s" if other else "")) from None
    arch = dict(cfg.model.arch)
    chosen = _choose_size(family.name, read, size, path, state)
    decoded = _codec_for(cfg, data_dir, family, read.get("grid_size"))
    info = decoded["info"]
    from_data = family.arch_from_data(info)
    if not data_dir:
        from_data.pop("num_classes")  # no data set: the checkpoint's classes
    where = f"the data set {data_dir}" if data_dir else f"the {decoded['tokenizer']['name']} tokenizer"
    _agree(read, from_data, arch, path, where)
    arch = {**arch, **read, **from_data}
    try:
        with torch.device("meta"):  # no init, no second copy of a 1B model: the file's tensors are assigned
            model = build_model(family.name, chosen, **arch)
    except ValueError as e:
        raise UserError(f"cannot build {family.name} {chosen} with {_fields_text(arch)}: "
                        f"{str(e).splitlines()[0]}") from None
    mapped = spec.from_official(state, model.config)
    _check_keys(model, mapped, path, f"{family.name} {chosen}")
    model.load_state_dict(mapped, strict=True, assign=True)
    state_out = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    num_classes = arch.get("num_classes", info.num_classes)
    names = decoded["class_names"] or [str(i) for i in range(num_classes)]
    meta = {
        "family": family.name,
        "size": chosen,
        "arch": arch,
        "model_config": json_ready(dataclasses.asdict(model.config)),
        "weights": "ema" if entry and "ema" in entry else "raw",
        "tokenizer": decoded["tokenizer"],
        "data": {"dir": decoded["dir"], "source": decoded["source"], "num_classes": num_classes, "class_names": names,
                 "grid": list(info.grid), "vocab_size": info.vocab_size,
                 "column": {"name": decoded["column_name"], **decoded["column"]},
                 "tokenizer_fingerprint": decoded["tokenizer"]["fingerprint"]},
        "sample": json_ready(dataclasses.asdict(cfg.sample)),
        "steps": 0,
    }
    what = f"{family.name} {chosen} ({model.num_params():,} parameters)"
    return state_out, meta, what, entry


def json_ready(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


# --- codecs ----------------------------------------------------------------------------------


def import_codec(cfg: Config, codec_name: str, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Build codec `codec_name` from its config section with `path` as its checkpoint (the codec's
    own loader checks every key and shape) -> (its weights in the official layout, export meta,
    a short description). Writes nothing."""
    from raygen.models.tokenizers import CODECS

    codec = CODECS[codec_name]
    read_checkpoint(path)  # not a checkpoint / refused by weights_only: the same one line as for models
    section = dataclasses.replace(getattr(cfg.tokenizer, codec_name), checkpoint=str(Path(path).resolve()))
    try:
        weights, config = codec.import_weights(section)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"'{path}' is not a {codec_name} tokenizer checkpoint of tokenizer.{codec_name}'s "
                        f"architecture: {str(e).splitlines()[0]}") from None
    meta = {CODEC_EXPORT: codec_name, "config": json_ready(config), "steps": 0}
    n = sum(v.numel() for v in weights.values() if v.is_floating_point())
    return weights, meta, f"{codec_name} tokenizer ({n:,} values)"


# --- the command -----------------------------------------------------------------------------


def import_checkpoint(cfg: Config, name: str, path: str, *, registered_name: str, alias: str | None,
                      size: str | None = None, data_dir: str | None = None) -> Imported:
    """Import `path` as family or codec `name`, log it as an MLflow run, register it."""
    from raygen.models.tokenizers import CODECS
    from raygen.platform import tracking
    from raygen.platform.evaluate.sampling import write_export

    uri = tracking.tracking_uri(cfg.workdir, cfg.tracking.uri)
    tracking.check_reachable(uri, "tracking.uri")
    if alias:
        tracking._check_alias(alias)
    lowered = name.lower()
    if lowered in families.FAMILIES:
        state, meta, what, entry = import_generator(cfg, lowered, path, size=size, data_dir=data_dir)
    elif lowered in CODECS and CODECS[lowered].importable:
        if size or data_dir:
            raise UserError(f"--size and --data apply to generators; a {lowered} tokenizer's architecture is "
                            f"tokenizer.{lowered}.*")
        (state, meta, what), entry = import_codec(cfg, lowered, path), None
    else:
        raise UserError(f"cannot import '{name}': importable are {', '.join(importable())}")
    digest = sha256_of(Path(path))
    source = {"file": str(Path(path).resolve()), "sha256": digest, "entry": entry}
    exp = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.workdir)
    kind = meta.get("family") or meta[CODEC_EXPORT]
    run_id = tracking.create_run(
        uri, exp, f"import-{registered_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"import.kind": kind, "import.size": meta.get("size", ""), **{f"import.{k}": v for k, v in source.items()}},
        {f"{IMPORT_TAG}.sha256": digest, f"{IMPORT_TAG}.file": Path(path).name,
         **({"raygen.family": kind, "raygen.size": meta["size"]} if "family" in meta else {"raygen.codec": kind})})
    meta = {**meta, "run_id": run_id, "imported": source}
    tmp = Path(tempfile.mkdtemp(prefix="raygen-import-"))
    try:
        write_export(tmp / "model", state, meta)
        tracking.log_artifact(uri, run_id, tmp / "model", tracking.MODEL_ARTIFACT)
        tracking.set_terminated(uri, run_id, "FINISHED")
    except BaseException:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version = tracking.register(uri, run_id, registered_name, alias)
    tracking.set_version_tags(uri, registered_name, version, {f"{IMPORT_TAG}.sha256": digest,
                                                              f"{IMPORT_TAG}.file": Path(path).name})
    return Imported(registered_name, version, run_id, what, entry, digest)
