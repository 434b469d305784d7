"""The one MLflow adapter, and a null tracker with the same methods for non-zero ranks and tests.

Everything the pipeline records goes through `Tracker`: runs (parent and nested), params (the flattened
resolved config), metrics (batched: one `log_batch` call per group, not one request per value),
artifacts, tags and registered models with aliases. No other module imports mlflow.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearning.outputs import nearest_existing
from unlearning.train.lifetime import alive

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # and on a tag value
# The experiment tag that picks the UI's view: the training one (runs, metrics, models), not the GenAI one
# (traces, sessions) an untagged experiment gets. MLflow 3.17 (the locked version) also keeps a global
# GenAI/training switch that overrides the tag; the links we print set it (`?workflowType=machine_learning`).
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
# A runs-table view the UI loads from an experiment tag (`?viewStateShareKey=<key>`, MLflow's "share view"): the
# columns it shows. Ours shows every top-level run's headline metrics, so runs compare without expanding anything.
RUNS_VIEW, RUNS_VIEW_TAG = "unlearning", "mlflow.sharedViewState.unlearning"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def metric_key(name: str) -> str:
    """`name` as an MLflow metric name: the characters MLflow refuses (such as the `@` of a snapshot's label,
    `ga@step2`) become `_`."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"train.lr": "0.0002", ...}; lists and None as text, long values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_CHARS]
    return out


class NullTracker:
    """Records nothing; stands in on ranks other than 0 and wherever tracking is off."""

    @property
    def run_id(self) -> str | None:
        return None

    @contextlib.contextmanager
    def run(self, name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None: ...

    def log_history(self, rows: Sequence[Mapping[str, float]], step_key: str = "step") -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def register_model(self, path: Path, name: str, aliases: Sequence[str], tags: Mapping[str, str] | None = None
                       ) -> str | None:
        return None

    def log_dataset(self, name: str, digest: str, source: Path, profile: Mapping[str, Any]) -> None: ...

    def log_model(self, path: Path, name: str, identity: str, params: Mapping[str, str] | None = None
                  ) -> str | None:
        return None

    def set_description(self, markdown: str) -> None: ...

    def show_in_runs_table(self, metrics: Sequence[str]) -> None: ...

    def run_url(self) -> str | None:
        return None

    def compare_url(self) -> str | None:
        return None


def ui_url(uri: str) -> str:
    """Where the runs of tracking URI `uri` are browsed: the server itself, or a local `mlflow ui`."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def ui_command(uri: str) -> str | None:
    """The command that serves a local store's UI (None for a tracking server, which has its own)."""
    return None if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"


OWNER_PID, OWNER_HOST = "unlearning.pid", "unlearning.host"  # which process owns a run (to end it if it died)


class MlflowTracker(NullTracker):
    """Tracks to an MLflow server or store (`tracking.uri`; SQLite locally), experiment `experiment`."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        # A client bound to `uri`, not mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for the whole
        # process, which would become the next config's default tracking URI.
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        if not found or EXPERIMENT_KIND not in found.tags:  # a kind someone chose in the UI stays
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        self._stack: list[str] = []

    @property
    def run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def run(self, name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None
            ) -> Iterator[MlflowTracker]:
        """A run (nested under the current one when `nested`), ended FINISHED, or FAILED on an exception."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {}), **self._owner}
        if nested and self._stack:
            all_tags[MLFLOW_PARENT_RUN_ID] = self._stack[-1]
        else:
            self.end_orphans()
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        self._stack.append(run.info.run_id)
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        finally:
            self.client.set_terminated(run.info.run_id, status=status)
            self._stack.pop()

    @property
    def _owner(self) -> dict[str, str]:
        return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()}

    def end_orphans(self) -> list[str]:
        """Mark KILLED the runs still RUNNING whose process on this host is gone (an `unlearn` killed by SIGKILL or
        the OOM killer cannot end its own runs); their ids."""
        host = socket.gethostname()
        found = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'"))
        ended = []
        for run in found:
            pid = int(run.data.tags.get(OWNER_PID, "0") or 0)
            if pid and pid != os.getpid() and not alive(pid):
                self.client.set_terminated(run.info.run_id, status="KILLED")
                ended.append(run.info.run_id)
        return ended

    def _current(self) -> str:
        if not self._stack:
            raise RuntimeError("no MLflow run is active; log inside `with tracker.run(...)`")
        return self._stack[-1]

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit on params per batch
            self.client.log_batch(self._current(), params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Log the finite values in one batch; None (unavailable) and NaN are skipped, not logged as 0."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and float(v) == float(v) and abs(float(v)) != float("inf")]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self._current(), metrics=items[i:i + BATCH])

    def log_history(self, rows: Sequence[Mapping[str, float]], step_key: str = "step") -> None:
        """A training history (one mapping per step) as metric series, in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, int(row[step_key])) for row in rows for k, v in row.items()
                 if k != step_key and isinstance(v, int | float)]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self._current(), metrics=items[i:i + BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self._current(), str(path), artifact_path)
        else:
            self.client.log_artifact(self._current(), str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self._current(), k, str(v))

    def register_model(self, path: Path, name: str, aliases: Sequence[str], tags: Mapping[str, str] | None = None
                       ) -> str | None:
        """Register the checkpoint directory `path` under `name` and point `aliases` at it; returns the version.

        A checkpoint already registered (same `identity` tag) only gets the aliases moved to its version, so a
        rerun served from the cache uploads no weights. Otherwise the directory is logged as this run's
        artifact and becomes a new version, tagged with `tags`.
        """
        from mlflow.exceptions import MlflowException

        tags = dict(tags or {})
        with contextlib.suppress(MlflowException):  # already registered: add a version
            self.client.create_registered_model(name)
        version = None
        if "identity" in tags:
            found = [v for v in self.client.search_model_versions(f"name = '{name}'")
                     if v.tags.get("identity") == tags["identity"]]
            version = found[0].version if found else None
        if version is None:
            run_id = self._current()
            artifact = f"models/{tags.get('label', name)}"
            self.client.log_artifacts(run_id, str(path), artifact)
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact}"
            version = self.client.create_model_version(name, source, run_id=run_id, tags=tags).version
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, version)
        return str(version)

    def log_dataset(self, name: str, digest: str, source: Path, profile: Mapping[str, Any]) -> None:
        """The prepared data as the current run's dataset input: `digest` (its fingerprint) says which data it
        was, `source` where it lies, `profile` its split sizes (the UI's Datasets column and panel)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": str(source)}),
                          profile=json.dumps(dict(profile)))
        self.client.log_inputs(self._current(), datasets=[
            DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])])

    def log_model(self, path: Path, name: str, identity: str, params: Mapping[str, str] | None = None
                  ) -> str | None:
        """The checkpoint directory `path` as a logged model named `name`, an output of the current run and of the
        runs above it; its id. `params`: as `flatten` gives them.

        A checkpoint already logged in this experiment (same `identity`: a rerun served from the cache) is
        linked to the current run as it is, without uploading its weights again."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run_id = self._current()
        found = self.client.search_logged_models([self.experiment_id], max_results=1,
                                                 filter_string=f"tags.identity = '{identity}'")
        if found:
            model_id = found[0].model_id
        else:
            model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                    tags={"identity": identity, "path": str(path)},
                                                    params=dict(params or {}), model_type="unlearned")
            model_id = model.model_id
            self.client.log_model_artifacts(model_id, str(path))
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        for run in self._stack:  # the run that trained it and the runs above (the runs table's Models column)
            self.client.log_outputs(run, [LoggedModelOutput(model_id, 0)])
        return model_id

    def set_description(self, markdown: str) -> None:
        """The current run's description (the UI's Description panel), cut to MLflow's tag limit."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        if len(markdown) > MAX_TAG_CHARS:
            markdown = markdown[:MAX_TAG_CHARS - 80] + "\n\n… (cut here: the whole report is the artifact report.md)"
        self.client.set_tag(self._current(), MLFLOW_RUN_NOTE, markdown)

    def show_in_runs_table(self, metrics: Sequence[str]) -> None:
        """Add `metrics` to the columns of the experiment's runs-table view (`compare_url`), after the ones that
        earlier runs added: the Dataset and Models columns, then the metrics."""
        import json

        found = self.client.get_experiment(self.experiment_id).tags.get(RUNS_VIEW_TAG)
        columns = ["attributes.`Dataset`", "attributes.`Models`"]
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            columns = list(json.loads(found or "")["selectedColumns"])
        columns += [c for c in (f"metrics.`{metric_key(m)}`" for m in metrics) if c not in columns]
        self.client.set_experiment_tag(self.experiment_id, RUNS_VIEW_TAG, json.dumps({"selectedColumns": columns}))

    def run_url(self) -> str | None:
        """The current run's page in the MLflow UI (its training view)."""
        return f"{ui_url(self.uri)}/#/experiments/{self.experiment_id}/runs/{self._current()}?{TRAINING_VIEW}"

    def compare_url(self) -> str | None:
        """The experiment's runs table with the headline metric columns (`show_in_runs_table`)."""
        return (f"{ui_url(self.uri)}/#/experiments/{self.experiment_id}/runs?{TRAINING_VIEW}"
                f"&viewStateShareKey={RUNS_VIEW}")


def tracking_problems(uri: str, timeout_s: float = 5.0) -> list[str]:
    """Why MLflow could not track to `uri`, found in seconds before any stage runs: a file store (MLflow 3 keeps
    it read-only), a SQLite database whose directory cannot be made, a server that does not answer."""
    from urllib.parse import urlsplit

    if uri.lower() == "none":
        return []
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    fix = "use tracking.uri=sqlite:///<path>/mlflow.db locally or an http(s):// MLflow server"
    if scheme in ("", "file") or len(scheme) == 1:  # a bare path (C:\ on Windows) is a file store too
        return [f"tracking.uri {uri!r} is a file store, which MLflow 3 no longer writes to (maintenance mode); {fix}"]
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            return [f"tracking.uri {uri!r}: a SQLite URI is sqlite:///<relative path> or sqlite:////<absolute path>"]
        probe = nearest_existing(path.parent)
        if not probe.is_dir():
            return [f"tracking.uri {uri!r}: the database would be under {probe}, which is a file, not a directory; "
                    "point it at a directory"]
        if not os.access(probe, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return [f"tracking.uri {uri!r}: {path if path.exists() else probe} is not writable by this user; "
                    "point the database elsewhere"]
        return []
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return []  # it answered: a server is there (the health route may be absent or need credentials)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            return [f"tracking.uri {uri!r}: no MLflow server answers there ({reason}); start it (mlflow server "
                    f"--host {parts.hostname} --port {parts.port or 80} --backend-store-uri sqlite:///mlflow.db) or "
                    "set tracking.uri=sqlite:///mlflow.db; nothing was run"]
    return []


def tracker_for(uri: str | None, experiment: str, *, rank: int = 0) -> NullTracker:
    """The MLflow tracker on rank 0 with a URI; the null tracker elsewhere."""
    return MlflowTracker(uri, experiment) if uri and uri.lower() != "none" and rank == 0 else NullTracker()
