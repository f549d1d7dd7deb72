"""Experiment trackers a run reports to besides OUTPUT_DIR/metrics.jsonl (`report_to`, always written): every
logged metric with its step, the resolved config as the run's parameters, sample completions as a table.

Each tracker goes through its project's own library (an optional extra: `pip install 'alignrl[wandb]'`) and
writes locally unless told otherwise:

- tensorboard: event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`); the config
  and the samples as text (markdown tables).
- wandb: offline, in OUTPUT_DIR/wandb (`wandb sync OUTPUT_DIR/wandb/offline-run-*` uploads it); WANDB_MODE=online
  streams instead, WANDB_DIR moves it; samples as a wandb.Table per logged step.
- trackio: trackio's local store (TRACKIO_DIR, default HF_HOME/trackio; `trackio show`); samples as a
  trackio.Table.
- mlflow: a SQLite store in OUTPUT_DIR/mlflow.db with artifacts in OUTPUT_DIR/mlartifacts (`mlflow ui
  --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db`, with the full `mlflow` package), or MLFLOW_TRACKING_URI;
  config as params (values cut to mlflow's limit), samples as a table artifact per logged step
  (samples/step_N.json).

Only rank 0 reports. A resumed run continues the same wandb, mlflow and trackio run (ids kept in
OUTPUT_DIR/trackers.json); tensorboard drops what the earlier run logged after the checkpoint.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import yaml

from alignrl.errors import AlignRLError

IDS_FILE = "trackers.json"  # run ids a resumed run continues, by tracker


class Tracker:
    """One tracker: started once on rank 0, then fed every logged row and sample batch, closed at the end."""

    name: ClassVar[str]
    modules: ClassVar[tuple[str, ...]]  # what it imports; a missing one names the extra to install

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return cls.modules

    def start(self, out: Path, config: dict[str, Any], resumed_step: int | None) -> None:
        """`config`: the resolved options (plus `algorithm`); `resumed_step`: the checkpoint's step when resuming."""
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of completions: `columns` (step first) and one list of values per row."""
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = "tensorboard"
    modules = ("tensorboard",)

    def start(self, out: Path, config: dict[str, Any], resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = out / "tensorboard"
        if resumed_step is None:  # a fresh run in this directory (rundir allowed it): the earlier events go
            for p in logdir.glob("events.out.tfevents.*"):
                p.unlink()
        # resuming: readers drop what the earlier run logged after the checkpoint (purge_step)
        self.writer = SummaryWriter(str(logdir), purge_step=None if resumed_step is None else resumed_step + 1)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), resumed_step or 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB(Tracker):
    name = "wandb"
    modules = ("wandb",)

    def start(self, out: Path, config: dict[str, Any], resumed_step: int | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=_project(config, "WANDB_PROJECT"),
            name=_run_name(config, out),
            id=_saved_id(out, self.name) if resumed_step is not None else None,
            resume="allow",
            config=config,
            dir=None if os.environ.get("WANDB_DIR") else str(out),
            mode=None if os.environ.get("WANDB_MODE") else "offline",  # WANDB_MODE=online streams to the server
        )
        _save_id(out, self.name, self.run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        table = self.wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        self.run.log({"samples": table}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio(Tracker):
    name = "trackio"
    modules = ("trackio",)

    def start(self, out: Path, config: dict[str, Any], resumed_step: int | None) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(
            project=_project(config),
            name=_run_name(config, out),
            config=config,
            resume="never" if resumed_step is None else "allow",  # resuming: the latest run of that name
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        self.trackio.log({"samples": self.trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self, failed: bool) -> None:
        self.trackio.finish()


class MLflow(Tracker):
    name = "mlflow"
    modules = ("mlflow",)

    @classmethod
    def required(cls) -> tuple[str, ...]:  # the default SQLite store needs these too (mlflow-skinny lacks them)
        return cls.modules if os.environ.get("MLFLOW_TRACKING_URI") else (*cls.modules, "sqlalchemy", "alembic")

    def start(self, out: Path, config: dict[str, Any], resumed_step: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = client = MlflowClient(env_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
        name = _project(config, "MLFLOW_EXPERIMENT_NAME")
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            where = None if env_uri else (out / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(name, artifact_location=where)
        self.run_id, logged = None, {}
        saved = _saved_id(out, self.name) if resumed_step is not None else None
        if saved is not None:
            with contextlib.suppress(Exception):  # gone from the store: start a new run
                logged = client.get_run(saved).data.params
                client.update_run(saved, status="RUNNING")
                self.run_id = saved
        if self.run_id is None:
            self.run_id = client.create_run(experiment_id, run_name=_run_name(config, out)).info.run_id
        _save_id(out, self.name, self.run_id)
        # params cannot change once logged: a resumed run adds only those it lacks
        params = [Param(k, v) for k, v in _mlflow_params(config).items() if k not in logged]
        for i in range(0, len(params), 100):  # mlflow's limit per batch
            client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def samples(self, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"samples/step_{step}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, WandB, Trackio, MLflow)}
NAMES = ("jsonl", *TRACKERS)  # jsonl: OUTPUT_DIR/metrics.jsonl and samples.jsonl, written whatever report_to says


def check_names(names: list[str]) -> None:
    """Config check: every name is a known tracker."""
    for name in names:
        if name not in NAMES:
            raise AlignRLError(f"report_to: unknown tracker {name!r} (choose from {', '.join(NAMES)})")


def check_installed(names: list[str]) -> None:
    """Import each tracker's library now, before the run touches its output directory: a missing one stops it with
    one line naming the extra to install."""
    check_names(names)
    for name in dict.fromkeys(names):
        if name in TRACKERS:
            for module in TRACKERS[name].required():
                _import(name, module)


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        raise AlignRLError(f"report_to: {name} needs the {missing!r} package: pip install 'alignrl[{name}]'") from None
    except ImportError as e:  # installed but broken (a version mismatch)
        raise AlignRLError(
            f"report_to: {name}: importing {module} failed ({_first_line(e)}); reinstall: pip install 'alignrl[{name}]'"
        ) from None


class Trackers:
    """The trackers of one run (rank 0): rows and samples go to each; closed once, even when the trainer raises
    (`close_open`, called by rundir.releases_output_dir, which every trainer runs under)."""

    def __init__(self, out: Path, trackers: list[Tracker]):
        self.out = out
        self.trackers = trackers
        _OPEN[_key(out)] = self

    def log(self, step: int, row: dict[str, Any]) -> None:
        metrics = {
            k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v) and k != "step"
        }
        if metrics:
            for t in self.trackers:
                t.log(step, metrics)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = ["step", *dict.fromkeys(k for r in rows for k in r if k != "step")]
        table = [[step, *(_cell(r.get(c)) for c in columns[1:])] for r in rows]
        for t in self.trackers:
            t.samples(step, columns, table)

    def close(self, failed: bool = False) -> None:
        """Flush and end every tracker's run (failed: marked so where the tracker has run states); idempotent. A
        tracker that fails to close is reported and the others are still closed."""
        if _OPEN.get(_key(self.out)) is self:
            del _OPEN[_key(self.out)]
        trackers, self.trackers = self.trackers, []
        errors = []
        for t in trackers:
            try:
                t.close(failed)
            except Exception as e:
                errors.append(f"{t.name}: {_first_line(e)}")
        if errors:
            print(f"alignrl: warning: report_to: closing {'; '.join(errors)}", file=sys.stderr)


_OPEN: dict[str, Trackers] = {}  # resolved output_dir -> the trackers its run has open


def start(names: list[str], out: Path, config: dict[str, Any], resumed_step: int | None) -> Trackers | None:
    """Start the trackers `names` names (jsonl aside; None when there are none) for the run in `out`. A tracker
    that fails to start stops the run with one line; the ones already started are closed."""
    check_installed(names)
    started: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name not in TRACKERS:
            continue
        tracker = TRACKERS[name]()
        try:
            tracker.start(out, config, resumed_step)
        except Exception as e:
            Trackers(out, started).close(failed=True)
            raise AlignRLError(f"report_to: {name} could not start: {_first_line(e)}") from None
        started.append(tracker)
    return Trackers(out, started) if started else None


def close_open(out: Path, failed: bool) -> None:
    """Close the trackers a run in `out` left open (it raised before `finish`); no-op if none."""
    trackers = _OPEN.get(_key(out))
    if trackers is not None:
        trackers.close(failed)


def _key(out: Path) -> str:
    return str(out.resolve())


def _project(config: dict[str, Any], env: str | None = None) -> str:
    """cfg.project, else the tracker's own variable (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME), else alignrl."""
    return config.get("project") or (os.environ.get(env) if env else None) or "alignrl"


def _run_name(config: dict[str, Any], out: Path) -> str:
    return config.get("run_name") or out.resolve().name


def _saved_id(out: Path, name: str) -> str | None:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        value = json.loads((out / IDS_FILE).read_text()).get(name)
        return value if isinstance(value, str) else None
    return None


def _save_id(out: Path, name: str, run_id: str) -> None:
    ids: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((out / IDS_FILE).read_text())
        ids = loaded if isinstance(loaded, dict) else {}
    ids[name] = run_id
    (out / IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_params(config: dict[str, Any]) -> dict[str, str]:
    """Config values as mlflow params: nested options flattened (a.b), lists as JSON, cut to mlflow's limit."""
    limit = 6000
    with contextlib.suppress(ImportError):
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    params = {}
    for k, v in _flatten(config).items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        params[_mlflow_key(k)] = text[:limit]
    return params


def _mlflow_key(key: str) -> str:
    """A metric or param name mlflow accepts (letters, digits, _ - . / : and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def _cell(value: Any) -> Any:
    """A table value: numbers, strings and None as they are; anything else (a chat prompt's messages) as JSON."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _md_cell(value: Any) -> str:
    """A value as one markdown table cell: escaped, newlines as <br>."""
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
