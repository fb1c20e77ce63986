"""CTF's fine -> coarse lookup on disk: clustering a data set's codebook, files, fingerprints, the cache.

A lookup file (JSON) holds the two tables, K, the k-means settings, the fingerprint of the
tables and the fingerprint of the tokenizer whose codebook was clustered:

    raygen cluster --data work/data/digits-palette-16 --clusters 32 --out lookup-k32.json

`raygen train` with family ctf takes `ctf.lookup` when given, and otherwise clusters the data
set's codebook itself (deterministic for ctf.clusters/seed/iters) and caches the file in
<workdir>/cache/ctf/. Either way the file is logged with the run and its fingerprint goes
into the model's config, so the model's weights and its lookup stay together.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygen.errors import ConfigError, DataError, UserError
from raygen.models.ctf import Lookup, check_lookup, cluster_codebook, lookup_fingerprint
from raygen.models.tokenizers import from_spec

FORMAT = "raygen-ctf-lookup"
VERSION = 1


@dataclass
class LookupFile:
    lookup: Lookup
    meta: dict[str, Any]  # everything in the file but the tables
    path: Path

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def cluster_dataset(manifest: dict[str, Any], clusters: int, *, seed: int = 0, iters: int = 100) -> tuple[Lookup, dict[str, Any]]:
    """k-means over the codebook of the tokenizer that made the data set -> (lookup, file meta)."""
    spec = manifest["tokenizer"]
    tok = from_spec(spec)
    try:
        codebook = tok.codebook()  # (V, E)
    except NotImplementedError as e:
        raise DataError(f"cannot cluster: {e}") from None
    try:
        lookup = cluster_codebook(codebook, clusters, seed=seed, iters=iters)
    except ValueError as e:
        raise ConfigError(f"ctf.clusters={clusters}: {e}") from None
    sizes = torch.bincount(lookup.fine_to_coarse, minlength=clusters).tolist()
    centres = torch.stack([codebook[lookup.fine_to_coarse == c].float().mean(0) for c in range(clusters)])
    inertia = float((codebook.float() - centres[lookup.fine_to_coarse]).pow(2).sum())
    meta = {
        "format": FORMAT, "version": VERSION, "clusters": clusters, "vocab_size": lookup.vocab_size,
        "seed": seed, "iters": iters, "fingerprint": lookup.fingerprint(),
        "tokenizer": {"name": spec["name"], "fingerprint": spec["fingerprint"]},
        "cluster_sizes": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "inertia": inertia,
    }
    return lookup, meta


def write_lookup(path: str | Path, lookup: Lookup, meta: dict[str, Any]) -> Path:
    """Write atomically (tmp + rename); an existing file with other tables is refused."""
    path = Path(path)
    if path.exists():
        old = read_lookup(path)
        if old.fingerprint != meta["fingerprint"]:
            raise UserError(f"'{path}' already holds another lookup ({old.fingerprint}); choose another --out")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**meta, "fine_to_coarse": lookup.fine_to_coarse.tolist(), "representative": lookup.representative.tolist()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)
    return path


def read_lookup(path: str | Path) -> LookupFile:
    """Read and check a lookup file: format, tables, and that the tables match their fingerprint."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"lookup file '{path}' does not exist (make one with `raygen cluster`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read lookup file '{path}': {e}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
        raise UserError(f"'{path}' is not a raygen CTF lookup (format {FORMAT} v{VERSION})")
    try:
        f2c = torch.tensor(body.pop("fine_to_coarse"), dtype=torch.long)
        rep = torch.tensor(body.pop("representative"), dtype=torch.long)
        check_lookup(f2c, rep)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"lookup file '{path}' is damaged: {e}") from None
    if lookup_fingerprint(f2c, rep) != body.get("fingerprint"):
        raise UserError(f"lookup file '{path}' is damaged: its tables do not match its fingerprint")
    return LookupFile(Lookup(f2c, rep), body, path)


def cache_path(workdir: str | Path, manifest: dict[str, Any], clusters: int, seed: int, iters: int) -> Path:
    tok = manifest["tokenizer"]["fingerprint"]
    return Path(workdir) / "cache" / "ctf" / f"lookup-{tok}-k{clusters}-s{seed}-i{iters}.json"


def resolve_lookup(settings, manifest: dict[str, Any], workdir: str | Path, *, data_dir: str = "the data set") -> LookupFile:
    """The lookup a ctf run uses: ctf.lookup when set (checked), else the cached or new clustering."""
    if settings.lookup:
        lf = read_lookup(settings.lookup)
        if lf.meta["clusters"] != settings.clusters:
            raise ConfigError(
                f"ctf.lookup '{settings.lookup}' has {lf.meta['clusters']} clusters but ctf.clusters={settings.clusters}; "
                "set one to match the other"
            )
    else:
        path = cache_path(workdir, manifest, settings.clusters, settings.seed, settings.iters)
        if path.exists():
            lf = read_lookup(path)
        else:
            lookup, meta = cluster_dataset(manifest, settings.clusters, seed=settings.seed, iters=settings.iters)
            lf = LookupFile(lookup, meta, write_lookup(path, lookup, meta))
    want = manifest["tokenizer"]["fingerprint"]
    if lf.meta["tokenizer"]["fingerprint"] != want:
        raise DataError(
            f"lookup '{lf.path}' clusters the codebook of tokenizer {lf.meta['tokenizer']['fingerprint']}, but "
            f"{data_dir} was tokenized with {want}; run `raygen cluster` on this data set"
        )
    if lf.meta["vocab_size"] != manifest["vocab_size"]:
        raise DataError(f"lookup '{lf.path}' covers {lf.meta['vocab_size']} ids; {data_dir} has {manifest['vocab_size']}")
    return lf


# --- a stage-1 run and a stage-2 run as one registered generator ------------------------------


def make_pair(uri: str, stage1_run: str, stage2_run: str, *, workdir: str) -> tuple[str, dict[str, float]]:
    """Join two finished CTF runs into one MLflow run whose `model/` is a pair export.

    The pair run holds both exports (stage1/, stage2/), the stage runs' ids as params, a sample
    grid and, for digits, eval/class_acc. Sampling defaults: stage 1's sample section, with the
    stage-2 run's sample.knobs (fine_temperature, fine_top_k, restrict). Returns (run id, metrics).
    """
    import shutil
    import tempfile

    from raygen.config import load_config
    from raygen.platform import tracking
    from raygen.platform.sampling import PAIR_KIND, load_export, read_export_meta, write_pair_meta
    from raygen.platform.train import finish_with_samples

    metas, dirs = [], []
    for want, run_id in ((1, stage1_run), (2, stage2_run)):
        d, _ = tracking.resolve_model(uri, f"runs:/{run_id}")
        m = read_export_meta(d)
        stage = m.get("model_config", {}).get("stage")
        if m.get("family") != "ctf" or stage != want:
            what = f"a CTF stage-{stage} run" if m.get("family") == "ctf" else f"a {m.get('family')} run"
            raise UserError(f"run '{run_id}' is {what}; a CTF pair needs the stage-1 run first, then --stage2 "
                            "the stage-2 run")
        metas.append(m)
        dirs.append(d)
    m1, m2 = metas
    if m1["data"]["tokenizer_fingerprint"] != m2["data"]["tokenizer_fingerprint"]:
        raise UserError(f"the stages were trained on data from different tokenizers "
                        f"({m1['data']['tokenizer_fingerprint']} vs {m2['data']['tokenizer_fingerprint']})")
    pair_dir = Path(tempfile.mkdtemp(prefix="raygen-ctf-pair-"))
    shutil.copytree(dirs[0], pair_dir / "stage1")
    shutil.copytree(dirs[1], pair_dir / "stage2")
    sample = {**m1["sample"], "knobs": {**m1["sample"].get("knobs", {}), **m2["sample"].get("knobs", {})}}
    meta = {"family": "ctf", "kind": PAIR_KIND, "size": f"{m1['size']}+{m2['size']}", "arch": m1["arch"],
            "model_config": m1["model_config"], "stage2_model_config": m2["model_config"],
            "tokenizer": m1["tokenizer"], "data": m1["data"], "sample": sample, "ctf_lookup": m1.get("ctf_lookup"),
            "stage_runs": {"stage1": stage1_run, "stage2": stage2_run}}
    write_pair_meta(pair_dir, meta)
    model, _ = load_export(pair_dir)  # checks the stages share a lookup, vocabulary, grid and classes
    n_params = model.num_params()

    experiment = tracking.get_run(uri, stage1_run).info.experiment_id
    params = {"ctf.stage1_run": stage1_run, "ctf.stage2_run": stage2_run, "ctf.stage1_size": m1["size"],
              "ctf.stage2_size": m2["size"], "ctf.lookup": m1["model_config"]["lookup_fingerprint"],
              "derived.n_params": n_params, **{f"sample.{k}": v for k, v in sample.items()}}
    run_id = tracking.create_run(uri, experiment, f"ctf-pair-{m1['size']}+{m2['size']}", params,
                                 {"raygen.family": "ctf", "raygen.size": meta["size"], "raygen.kind": PAIR_KIND})
    meta["run_id"] = run_id
    write_pair_meta(pair_dir, meta)
    try:
        tracking.log_artifact(uri, run_id, pair_dir, tracking.MODEL_ARTIFACT)
        cfg = load_config(None, [f"workdir={workdir}"], **{f"sample.{k}": v for k, v in sample.items()})
        metrics = finish_with_samples(cfg, uri, run_id, pair_dir)
    except BaseException:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise
    tracking.set_terminated(uri, run_id, "FINISHED")
    return run_id, metrics
