"""MLflow in one place: runs, metrics, artifacts, the model registry and model URIs.

The driver creates the experiment and the run (so only one process ever migrates a fresh
SQLite store) and passes the run id to the workers; rank 0 logs into it through
`MlflowTracker`, every other rank gets a `NullTracker`. A model is a directory with
`model.pt` (fp32 state dict, loads with `torch.load(weights_only=True)`) and `config.json`,
logged as the run's `model/` artifact and registered by its artifact URI.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from raygen.errors import UserError

MODEL_ARTIFACT = "model"


def tracking_uri(workdir: str, uri: str | None = None) -> str:
    """MLFLOW_TRACKING_URI > tracking.uri > sqlite:///<workdir>/mlflow.db. A server (http[s]://)
    must answer a TCP connection within a few seconds, or this is one UserError naming it."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env or uri:
        check_reachable(env or uri, "MLFLOW_TRACKING_URI" if env else "tracking.uri")
        return env or uri
    path = Path(workdir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from raygen.errors import UserError

        raise UserError(f"workdir '{workdir}' cannot be made ({e.strerror or e}); set workdir= to a directory "
                        "you can write") from None
    return f"sqlite:///{path / 'mlflow.db'}"


_REACHED: set[str] = set()  # servers this process has already reached
CONNECT_TIMEOUT_S = 3.0


def check_reachable(uri: str, where: str) -> None:
    """Connect to an http(s) tracking server's host and port once per process; refuse quickly with
    one line instead of MLflow's retries and traceback."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or uri in _REACHED:
        return
    import socket

    from raygen.errors import UserError

    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "connection refused" if isinstance(e, ConnectionRefusedError) else (
            f"no answer in {CONNECT_TIMEOUT_S:g} s" if isinstance(e, socket.timeout) else str(e) or type(e).__name__)
        raise UserError(f"cannot reach the MLflow tracking server {uri} ({where}): {reason}; start it, or unset "
                        f"{where} to track in sqlite:///<workdir>/mlflow.db") from None
    _REACHED.add(uri)


def _client(uri: str):
    # Never mlflow.set_tracking_uri(): it exports MLFLOW_TRACKING_URI, which would then
    # outrank every later tracking.uri in this process (and its children).
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str, workdir: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        location = (Path(workdir).resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def create_run(uri: str, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    from mlflow.entities import Param

    client = _client(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def set_terminated(uri: str, run_id: str, status: str) -> None:
    _client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str, clear_tags: tuple[str, ...] = ()) -> None:
    client = _client(uri)
    tags = get_run(uri, run_id).data.tags
    for key in clear_tags:
        if key in tags:
            client.delete_tag(run_id, key)
    client.update_run(run_id, status="RUNNING")


def get_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run '{run_id}' in {uri}") from None


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = _client(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    _client(uri).log_text(run_id, text, name)


def log_new_params(uri: str, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Log the params the run does not have yet; MLflow params never change, so a key that is
    already there with another value is left alone and returned as {key: (kept, offered)}."""
    from mlflow.entities import Param

    have = get_run(uri, run_id).data.params
    new = {k: str(v)[:6000] for k, v in params.items()}
    conflicts = {k: (have[k], v) for k, v in new.items() if k in have and have[k] != v}
    items = [Param(k, v) for k, v in sorted(new.items()) if k not in have]
    for i in range(0, len(items), 100):
        _client(uri).log_batch(run_id, params=items[i : i + 100])
    return conflicts


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


class MlflowTracker:
    """Rank 0's handle on the run the driver created."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_until:
            log_metrics(self.uri, self.run_id, metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        log_artifact(self.uri, self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        _client(self.uri).set_tag(self.run_id, key, value)

    def resumed(self, step: int, metric: str = "train/loss") -> None:
        """A restarted worker group resumes at `step`: count the attempt (tag raygen.attempts, metric
        train/restarts at that step) and skip, from now on, log steps the run already holds, so a
        curve has one point per step however many times its steps ran."""
        client = _client(self.uri)
        run = client.get_run(self.run_id)
        attempts = int(run.data.tags.get(ATTEMPTS_TAG, "1")) + 1
        client.set_tag(self.run_id, ATTEMPTS_TAG, str(attempts))
        self.logged_until = max((m.step for m in client.get_metric_history(self.run_id, metric)), default=-1)
        log_metrics(self.uri, self.run_id, {"train/restarts": attempts - 1}, step)

    logged_until: int = -1  # log steps up to here are already in the run (from an earlier attempt)


ATTEMPTS_TAG = "raygen.attempts"


class NullTracker:
    """Every rank but 0: logging is a no-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def resumed(self, step: int, metric: str = "train/loss") -> None:
        pass


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def register(uri: str, run_id: str, name: str, alias: str | None = None) -> int:
    """Register the run's `model/` artifact as a new version of NAME (created if missing)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    run = get_run(uri, run_id)
    artifacts = [f.path for f in client.list_artifacts(run_id)]
    if MODEL_ARTIFACT not in artifacts:
        raise UserError(f"run '{run_id}' has no '{MODEL_ARTIFACT}' artifact (did it finish training?)")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    if alias:
        _check_alias(alias)
    parent = run.data.tags.get(PARENT_MODEL_TAG)  # a fine-tuned run: its version names where it started
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={PARENT_MODEL_TAG: parent} if parent else None)
    if alias and alias.lower() != LATEST:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


PARENT_MODEL_TAG = "raygen.init_from"  # run and model-version tag: the model a run's weights started from


# MLflow reserves `latest`: models:/NAME@latest always resolves to the newest version, so
# registering "with alias latest" needs no alias of its own.
LATEST = "latest"


def _check_alias(alias: str) -> None:
    if alias.lower() == LATEST:
        return
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", alias) or re.fullmatch(r"v\d+", alias):
        raise UserError(f"bad alias '{alias}': use letters, digits, '_' and '-', not starting with a digit, and not vN")


def set_alias(uri: str, name: str, alias: str, version: int) -> None:
    _check_alias(alias)
    if alias.lower() == LATEST:
        raise UserError("'latest' always means the newest version in MLflow; it cannot point at another version")
    _client(uri).set_registered_model_alias(name, alias, str(version))


def list_models(uri: str) -> list[dict[str, Any]]:
    client = _client(uri)
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        numbers = sorted(int(v.version) for v in versions)
        aliases = {a: int(v) for a, v in (getattr(rm, "aliases", {}) or {}).items()}
        if numbers:
            aliases[LATEST] = numbers[-1]
        out.append({"name": rm.name, "versions": numbers, "aliases": aliases})
    return sorted(out, key=lambda m: m["name"])


def show_model(uri: str, name: str) -> dict[str, Any]:
    client = _client(uri)
    names = [m["name"] for m in list_models(uri)]
    if name not in names:
        raise UserError(f"no registered model '{name}'; registered: {', '.join(names) or '(none)'}")
    rm = client.get_registered_model(name)
    aliases_by_version: dict[str, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases_by_version.setdefault(str(v), []).append(a)
    all_versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    if all_versions:
        aliases_by_version.setdefault(str(all_versions[-1].version), []).append(LATEST)
    versions = []
    for v in all_versions:
        versions.append({"version": int(v.version), "run_id": v.run_id, "source": v.source,
                         "aliases": sorted(aliases_by_version.get(str(v.version), []))})
    return {"name": name, "versions": versions}


def resolve_model(uri: str, model: str, dst: str | Path | None = None) -> tuple[Path, str | None]:
    """A model reference -> (local directory with model.pt + config.json, run id or None).

    Accepts models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/path] or a local directory.
    Artifacts that are not already local files are downloaded into `dst` (a temporary
    directory when None).
    """
    if model.startswith("models:/"):
        mv = registered_version(uri, model)
        return _download(uri, mv.source, dst), mv.run_id
    if model.startswith("runs:/"):
        parts = model[len("runs:/") :].strip("/").split("/", 1)
        run_id = parts[0]
        sub = parts[1] if len(parts) > 1 else MODEL_ARTIFACT
        run = get_run(uri, run_id)
        return _download(uri, f"{run.info.artifact_uri.rstrip('/')}/{sub}", dst), run_id
    local = Path(model)
    if local.is_dir():
        if not (local / "config.json").is_file() or not ((local / "model.pt").is_file() or (local / "stage1").is_dir()):
            raise UserError(f"'{model}' is not an exported model directory (it needs config.json and model.pt)")
        return local, None
    raise UserError(
        f"cannot find model '{model}'; use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or an export directory"
    )


def registered_version(uri: str, model: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> its MLflow ModelVersion (@latest: the newest);
    a reference to nothing is one line listing what exists."""
    from mlflow.exceptions import MlflowException

    ref = model[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, alias = ref.split("/", 1)[0], None
    else:
        raise UserError(f"bad model URI '{model}'; use models:/NAME@ALIAS or models:/NAME/VERSION")
    names = [m["name"] for m in list_models(uri)]
    if name not in names:
        raise UserError(f"no registered model '{name}'; registered: {', '.join(names) or '(none)'}")
    client = _client(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, ref.split("/", 1)[1])
    except MlflowException:
        info = show_model(uri, name)
        aliases = sorted({a for v in info["versions"] for a in v["aliases"]})
        versions = [str(v["version"]) for v in info["versions"]]
        what = f"alias '{alias}'" if alias is not None else f"version '{ref.split('/', 1)[1]}'"
        raise UserError(
            f"model '{name}' has no {what}; aliases: {', '.join(aliases) or '(none)'}; versions: {', '.join(versions)}"
        ) from None


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths directly under `path` (the run's root when None)."""
    return [f.path for f in _client(uri).list_artifacts(run_id, path)]


def read_artifact_text(uri: str, run_id: str, path: str) -> str:
    get_run(uri, run_id)
    local = _client(uri).download_artifacts(run_id, path, tempfile.mkdtemp(prefix="raygen-art-"))
    return Path(local).read_text()


def _download(uri: str, artifact_uri: str, dst: str | Path | None = None) -> Path:
    import mlflow

    if artifact_uri.startswith("file://"):
        local = Path(artifact_uri[len("file://") :])
        if local.is_dir():
            return local
    if dst is None:
        dst = tempfile.mkdtemp(prefix="raygen-model-")
    else:
        Path(dst).mkdir(parents=True, exist_ok=True)
        dst = str(dst)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst, tracking_uri=uri))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot fetch model artifacts from {artifact_uri}: {e}") from None


# --------------------------------------------------------------------------------------
# Sweeps: child runs, version tags, a local server in front of a SQLite store
# --------------------------------------------------------------------------------------

PARENT_TAG = "mlflow.parentRunId"


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    """The runs whose `mlflow.parentRunId` tag is `parent_run_id` (MLflow Run objects)."""
    return list(_client(uri).search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                         max_results=5000))


def model_version(uri: str, model: str) -> tuple[str, int] | None:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (NAME, version); None for other references."""
    if not model.startswith("models:/"):
        return None
    mv = registered_version(uri, model)
    return mv.name, int(mv.version)


def alias_knobs(uri: str, model: str) -> dict[str, Any]:
    """The sampling knobs a sample-time sweep tagged on the version behind models:/NAME@ALIAS.

    A sweep that ranks knobs on one model sets ALIAS on that model's version and tags it
    `raygen.sweep.ALIAS.sample.*` (see `raygen.platform.sweep.driver`); the alias then means "these
    weights at these knobs". {} for any other reference, or an alias no sweep set.
    """
    from raygen.config import parse_override

    if not model.startswith("models:/") or "@" not in model:
        return {}
    name, alias = model[len("models:/") :].split("@", 1)
    if alias.lower() == LATEST:
        return {}
    prefix = f"raygen.sweep.{alias}."
    tags = registered_version(uri, model).tags
    return dict(parse_override(f"{k[len(prefix):]}={v}") for k, v in sorted(tags.items())
                if k.startswith(prefix + "sample."))


def set_version_tags(uri: str, name: str, version: int, tags: dict[str, Any]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def needs_local_server(uri: str) -> bool:
    """A SQLite store takes one writer process at a time safely; sweeps put a server in front of it."""
    return uri.startswith("sqlite:")


class LocalServer:
    """`mlflow server` on 127.0.0.1 (a free port) in front of a SQLite store, for one sweep.

    Only the server process touches the SQLite file while it runs; every trial logs over HTTP.
    Artifacts stay where the store's experiments put them (file:// under <workdir>/mlartifacts),
    so the runs read the same with or without the server. Start it, do other work, then `wait()`.
    """

    def __init__(self, store_uri: str, workdir: str, log_dir: str | Path):
        import atexit
        import subprocess
        import sys
        import time

        from raygen.platform.cluster.connect import free_port

        self.store_uri = store_uri
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / f"mlflow-server-{self.port}.log"
        artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
        # Job execution would start extra worker processes on the same SQLite file; a sweep needs none.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", store_uri, "--default-artifact-root", artifacts, "--no-serve-artifacts",
               "--workers", "1"]
        self.started = time.time()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        atexit.register(self.stop)

    def wait(self, timeout: float = 180.0) -> str:
        """Block until the server answers /health; returns its URI. A clear error if it cannot start."""
        import time
        import urllib.request

        t0 = time.time()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise UserError(f"the local MLflow server for {self.store_uri} exited with code {code} before it "
                                f"answered: {self._last_line()} (log: {self.log_path}); or point tracking.uri / "
                                "MLFLOW_TRACKING_URI at a running server")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise UserError(f"the local MLflow server for {self.store_uri} did not answer on {self.uri} within "
                                f"{timeout:.0f} s ({self._last_line()}; log: {self.log_path}); or point tracking.uri / "
                                "MLFLOW_TRACKING_URI at a running server")
            time.sleep(0.5)

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def stop(self) -> None:
        """Stop the server (its own process group: uvicorn's worker goes with it)."""
        import signal
        import subprocess

        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)  # the group this server was started in, nothing else
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
