"""Family `ctf` (coarse-to-fine, raygen/models/ctf.py): the plugin the platform sees.

What CTF needs beyond the defaults, all here:
- `ctf.*` settings: K clusters, an optional lookup file, the k-means seed and iterations;
- `prepare`: the fine->coarse lookup of the run, from `ctf.lookup` or by clustering the data
  set's codebook (deterministic for clusters/seed/iters, cached in <workdir>/cache/ctf/); its
  K and fingerprint go into the model's config, its tables to the workers (`bind`), the file
  into the run's artifacts (`ctf/`);
- exports: a stage 1 samples alone (coarse labels decoded as their representatives), a stage 2
  does not; `raygen models register STAGE1 --stage2 STAGE2` joins two runs into a pair export
  (stage1/, stage2/) that `load` rebuilds as one `CTFPair`;
- knobs of the pair's stage 2 (`fine_temperature`, `fine_top_k`, `fine_top_p`, `restrict`);
- the `raygen cluster` verb, which writes a lookup file.

A lookup file (JSON) holds the two tables, K, the k-means settings, the fingerprint of the
tables and the fingerprint of the tokenizer whose codebook was clustered:

    raygen cluster --data work/data/digits-palette-16 --clusters 32 --out lookup-k32.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygen.errors import ConfigError, DataError, UserError
from raygen.families import register
from raygen.families.base import Family, PaperRow, Prepared
from raygen.models.ctf import CTFPair, Lookup, check_lookup, cluster_codebook, lookup_fingerprint
from raygen.models.tokenizers import from_spec
from raygen.options import option

PAIR_KIND = "ctf-pair"


@dataclass
class CTFSettings:
    clusters: int = option(512, min=1, help="K coarse labels for family ctf (k-means over the tokenizer's codebook)")
    lookup: str | None = option(
        None, path=True,
        help="fine->coarse lookup file from `raygen cluster`; null = cluster now (cached in <workdir>/cache/ctf)")
    seed: int = option(0, help="k-means++ seed of the clustering")
    iters: int = option(100, min=1, help="k-means iterations at most")


@dataclass
class CTFPairKnobs:
    fine_temperature: float = option(1.0, min=0, help="stage 2's sampling temperature (tau2; 0 = greedy)")
    fine_top_k: int = option(0, min=0, help="stage 2: keep the k most likely fine ids (0 = all)")
    fine_top_p: float = option(1.0, min=0, max=1, help="stage 2's nucleus mass (1 = off)")
    restrict: bool = option(True, help="keep each fine id inside its coarse label's cluster")


# --- lookup files --------------------------------------------------------------------------


@dataclass
class LookupFile:
    lookup: Lookup
    meta: dict[str, Any]  # everything in the file but the tables
    path: Path

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


FORMAT = "raygen-ctf-lookup"
VERSION = 1


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
    from raygen.platform.evaluate.sampling import load_export, read_export_meta, write_export_meta
    from raygen.platform.train.driver import finish_with_samples

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
    write_export_meta(pair_dir, meta)
    model, _ = load_export(pair_dir)  # checks the stages share a lookup, vocabulary, grid and classes
    n_params = model.num_params()

    experiment = tracking.get_run(uri, stage1_run).info.experiment_id
    params = {"ctf.stage1_run": stage1_run, "ctf.stage2_run": stage2_run, "ctf.stage1_size": m1["size"],
              "ctf.stage2_size": m2["size"], "ctf.lookup": m1["model_config"]["lookup_fingerprint"],
              "derived.n_params": n_params, **{f"sample.{k}": v for k, v in sample.items()}}
    run_id = tracking.create_run(uri, experiment, f"ctf-pair-{m1['size']}+{m2['size']}", params,
                                 {"raygen.family": "ctf", "raygen.size": meta["size"], "raygen.kind": PAIR_KIND})
    meta["run_id"] = run_id
    write_export_meta(pair_dir, meta)
    try:
        tracking.log_artifact(uri, run_id, pair_dir, tracking.MODEL_ARTIFACT)
        cfg = load_config(None, [f"workdir={workdir}"], **{f"sample.{k}": v for k, v in sample.items()})
        metrics = finish_with_samples(cfg, uri, run_id, pair_dir)
    except BaseException:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise
    tracking.set_terminated(uri, run_id, "FINISHED")
    return run_id, metrics


# --- the paper's rows ------------------------------------------------------------------------
# A row's size is its stage 1 (B, L, XL); the stage 2 behind every row is the paper's 343M aux model
# (aux-L), K = 512. Table 1 / Table 2 use the grey defaults of Table 3: CFG 2.0, tau1 = tau2 = 1.1,
# stage-2 top-k "all". Table 3's sampling ablations are of LlamaGen-B + CTF with the 343M stage 2 (its
# tau2 = 1.1 row is Table 1's B row, number for number); the held settings of each sub-table follow from
# the rows the sub-tables share (5.33 = CFG 2, tau1 = tau2 = 1.0, top-k all; 4.16 = tau1 1.1, tau2 1.0).
# Left out: Table 3a (K = 128 / 1024: other models) and 3b's 111M / 775M stage 2 (other pairs).
TABLES_1_2 = "CTF (arXiv 2503.16194), Tables 1 and 2"
SETUP = "1xA100, batch 64, stage 1 + the 343M stage 2"
ASSUMED = ("Assumed (not in the sources): stage 1 samples without top-k/top-p; stage 2 keeps each fine id inside its "
           "coarse label's cluster (restrict, raygen's design) and uses no CFG; FID over 50K samples.")


def _sample(cfg: float, tau1: float, tau2: float, fine_top_k: int = 0) -> dict:
    return {"cfg_scale": cfg, "steps": 256, "temperature": tau1, "top_k": 0, "top_p": 1.0,
            "knobs": {"fine_temperature": tau2, "fine_top_k": fine_top_k, "fine_top_p": 1.0, "restrict": True}}


def _row(key: str, size: str, paper: str, params: str, sample: dict, scores: tuple[float, float, float, float],
         images_per_s: float | None, note: str) -> PaperRow:
    fid, inception_score, precision, recall = scores
    return PaperRow(key=key, size=size, paper=paper, model=f"LlamaGen-{size} + CTF", params=params, sample=sample,
                    fid=fid, inception_score=inception_score, precision=precision, recall=recall,
                    images_per_s=images_per_s, throughput_setup=SETUP if images_per_s else "",
                    note=f"{note} {ASSUMED}")


MAIN = ("FID/IS/P/R from Table 1, params and images/s from Table 2; CFG 2.0, tau1 = tau2 = 1.1 and stage-2 top-k "
        "all are Table 3's defaults (docs/models.md).")


def _ablation(key: str, table: str, sample: dict, scores: tuple[float, float, float, float], held: str) -> PaperRow:
    return _row(key, "B", f"CTF (arXiv 2503.16194), Table {table}", "87M+343M", sample, scores, None,
                f"Table {table}, LlamaGen-B + CTF with the 343M stage 2 (inferred: its tau2 = 1.1 row equals "
                f"Table 1's B row); {held}")


CTF_PAPER_ROWS: tuple[PaperRow, ...] = (
    _row("tau1.1-1.1", "B", TABLES_1_2, "87M+343M", _sample(2.0, 1.1, 1.1), (4.15, 254.99, 0.86, 0.48), 12.83, MAIN),
    _ablation("tau1.0-1.0", "3b-3e", _sample(2.0, 1.0, 1.0), (5.33, 285.15, 0.89, 0.43),
              "the row Tables 3b-3e share (343M stage 2, CFG 2.00, top-k all, tau1 1.0)."),
    _ablation("cfg1.75", "3c", _sample(1.75, 1.0, 1.0), (4.24, 247.02, 0.86, 0.48),
              "tau1 = tau2 = 1.0 held (inferred: its CFG 2.00 row is Table 3e's tau1 = 1.0 row)."),
    _ablation("cfg2.25", "3c", _sample(2.25, 1.0, 1.0), (6.71, 313.06, 0.90, 0.41),
              "tau1 = tau2 = 1.0 held (inferred: its CFG 2.00 row is Table 3e's tau1 = 1.0 row)."),
    _ablation("fine-top-k1", "3d", _sample(2.0, 1.0, 1.0, fine_top_k=1), (6.95, 210.21, 0.87, 0.39),
              "stage-2 top-k 1; CFG 2, tau1 = tau2 = 1.0 held (inferred: its 'All' row is Table 3e's tau1 = 1.0 row)."),
    _ablation("fine-top-k32", "3d", _sample(2.0, 1.0, 1.0, fine_top_k=32), (5.35, 286.73, 0.89, 0.43),
              "stage-2 top-k 32; CFG 2, tau1 = tau2 = 1.0 held (inferred: its 'All' row is Table 3e's tau1 = 1.0 "
              "row)."),
    _ablation("tau0.9-1.0", "3e", _sample(2.0, 0.9, 1.0), (7.30, 292.73, 0.90, 0.39),
              "tau1 0.9; tau2 = 1.0 held (inferred: its tau1 = 1.1 row is Table 3f's tau2 = 1.0 row)."),
    _ablation("tau1.1-1.0", "3e/3f", _sample(2.0, 1.1, 1.0), (4.16, 259.45, 0.86, 0.47),
              "the row Tables 3e (tau1 1.1) and 3f (tau2 1.0) share; CFG 2, top-k all."),
    _ablation("tau1.1-0.9", "3f", _sample(2.0, 1.1, 0.9), (5.55, 288.01, 0.89, 0.43),
              "tau2 0.9; tau1 = 1.1 held (Table 3f follows 3e's best tau1); CFG 2, top-k all."),
    _row("tau1.1-1.1", "L", TABLES_1_2, "310M+343M", _sample(2.0, 1.1, 1.1), (2.97, 291.53, 0.84, 0.53), 8.71,
         MAIN + " The defaults were ablated on B; that L and XL use them is an inference."),
    _row("tau1.1-1.1", "XL", TABLES_1_2, "734M+343M", _sample(2.0, 1.1, 1.1), (2.76, 299.69, 0.84, 0.55), 6.26,
         MAIN + " The defaults were ablated on B; that L and XL use them is an inference."),
)


# --- the plugin ----------------------------------------------------------------------------


class CTF(Family):
    name = "ctf"
    settings = CTFSettings
    settings_help = "coarse-to-fine (family ctf): codebook clusters"
    knobs = CTFPairKnobs  # a stage-2 run's knobs are its pair's; a stage 1 alone takes none
    paper_rows = CTF_PAPER_ROWS

    def prepare(self, cfg, manifest: dict[str, Any], data_dir: str, arch: dict[str, Any]) -> Prepared:
        lf = resolve_lookup(cfg.ctf, manifest, cfg.workdir, data_dir=f"data set '{data_dir}'")
        fields = {"clusters": lf.meta["clusters"], "lookup_fingerprint": lf.fingerprint}
        for key, value in fields.items():
            if key in arch and arch[key] != value:
                raise ConfigError(f"model.arch.{key}={arch[key]!r} does not match the run's lookup ({key}={value!r}); "
                                  "set ctf.clusters / ctf.lookup instead")
        payload = {"fine_to_coarse": lf.lookup.fine_to_coarse.tolist(),
                   "representative": lf.lookup.representative.tolist()}
        return Prepared(arch=fields, payload=payload, params={"derived.ctf_lookup": lf.fingerprint},
                        artifacts=[(str(lf.path), "ctf")], export={"ctf_lookup": lf.meta})

    def bind(self, model, payload: dict[str, Any] | None) -> None:
        if payload:
            model.bind_lookup(Lookup(torch.tensor(payload["fine_to_coarse"], dtype=torch.long),
                                     torch.tensor(payload["representative"], dtype=torch.long)))

    def can_sample(self, meta: dict[str, Any]) -> bool:
        return meta.get("kind") == PAIR_KIND or meta["model_config"].get("stage") == 1

    def paper_size(self, meta: dict[str, Any]) -> str:
        """A pair is its stage 1's size (the paper's rows pair each stage 1 with the 343M aux model); a
        lone stage is not what the table scores."""
        if meta.get("kind") == PAIR_KIND:
            return str(meta["size"]).split("+")[0]
        return f"{meta.get('size')} (stage {meta['model_config'].get('stage')} alone, not a pair)"

    def generate_kwargs(self, model, knobs: CTFPairKnobs) -> dict[str, Any]:
        return super().generate_kwargs(model, knobs) if isinstance(model, CTFPair) else {}

    def load(self, directory: Path, meta: dict[str, Any], device):
        if meta.get("kind") != PAIR_KIND:
            return super().load(directory, meta, device)
        from raygen.platform.evaluate.sampling import read_export_meta

        stages = [super(CTF, self).load(Path(directory) / d, read_export_meta(Path(directory) / d), device)
                  for d in ("stage1", "stage2")]
        try:
            return CTFPair(*stages).eval()
        except ValueError as e:
            raise UserError(f"'{directory}' is not a usable CTF pair: {e}") from None

    def add_commands(self, sub) -> None:
        from raygen.jobs.common import add_config_args

        p = sub.add_parser("cluster", help="CTF: cluster the tokenizer's codebook into K coarse labels (a lookup file)")
        p.add_argument("--data", help="= data.shards: the tokenized data set whose codebook to cluster")
        p.add_argument("--clusters", type=int, help="= ctf.clusters (K)")
        p.add_argument("--seed", type=int, help="= ctf.seed (k-means++)")
        p.add_argument("--out", help="lookup file to write; default: the cache `raygen train` reads (<workdir>/cache/ctf/)")
        add_config_args(p)
        p.set_defaults(func=run_cluster)

    def add_register_args(self, parser) -> None:
        parser.add_argument("--stage2", metavar="RUN_ID",
                            help="CTF: the stage-2 run; both stages become one pair run and one registered version")

    def compose(self, uri: str, run_id: str, args, workdir: str) -> tuple[str, str] | None:
        if not getattr(args, "stage2", None):
            return None
        pair_run, metrics = make_pair(uri, run_id, args.stage2, workdir=workdir)
        acc = f", class accuracy {metrics['eval/class_acc']:.3f}" if "eval/class_acc" in metrics else ""
        return pair_run, f"CTF pair run {pair_run}: stage 1 run {run_id} + stage 2 run {args.stage2}{acc}"


def run_cluster(args: argparse.Namespace) -> int:
    """`raygen cluster`: k-means over a data set's codebook -> a fine->coarse lookup file."""
    from raygen.jobs.common import check_writable, print_dry_run, resolve
    from raygen.platform.data import shards
    from raygen.platform.data.tokenize import data_dir_of

    cfg = resolve(args, **{"data.shards": args.data, "ctf.clusters": args.clusters, "ctf.seed": args.seed})
    data_dir = data_dir_of(cfg)
    manifest = shards.read_manifest(data_dir)
    c = cfg.ctf
    out = args.out or cache_path(cfg.workdir, manifest, c.clusters, c.seed, c.iters)
    if args.dry_run:
        print_dry_run(cfg, {"data": data_dir, "out": out})
        return 0
    if args.out:
        check_writable(args.out, "--out")
    lookup, meta = cluster_dataset(manifest, c.clusters, seed=c.seed, iters=c.iters)
    path = write_lookup(out, lookup, meta)
    sizes = meta["cluster_sizes"]
    print(f"{meta['vocab_size']} codebook entries -> {c.clusters} clusters (sizes {sizes['min']}..{sizes['max']}, "
          f"median {sizes['median']:g}); lookup {meta['fingerprint']}")
    print(f"lookup: {path}")
    if args.out:
        print(f"train with it: raygen train ... ctf.clusters={c.clusters} ctf.lookup={path}")
    return 0


register(CTF())
