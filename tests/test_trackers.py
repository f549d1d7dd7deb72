"""report_to: a run's metrics, config and sample completions reach tensorboard, wandb, trackio and mlflow (all
offline, under tmp_path), read back with each library's own reader; bad names and missing libraries are one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignrl import trackers
from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.errors import AlignRLError
from alignrl.trainers import grpo

ALL = "report_to=[jsonl,tensorboard,wandb,trackio,mlflow]"


@pytest.fixture(scope="session")
def trackio_store() -> Path:
    """The session's trackio store (conftest.py sets TRACKIO_DIR before anything imports trackio)."""
    store = Path(os.environ["TRACKIO_DIR"])
    if "trackio" in sys.modules:  # imported earlier in this process: its store must be this one
        from trackio.utils import TRACKIO_DIR

        assert Path(TRACKIO_DIR) == store, "trackio was imported before its store was set"
    return store


@pytest.fixture
def tracker_env(monkeypatch, tmp_path, trackio_store):
    """Everything the trackers write stays under tmp_path; nothing reaches a server."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(home / "wandb" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    return trackio_store


def _grpo_args(tiny_model, tmp_path, out="run", *extra):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    write_jsonl(tmp_path / "rl.jsonl", rows)
    return [
        f"model={tiny_model}",
        f"train_file={tmp_path / 'rl.jsonl'}",
        f"output_dir={tmp_path / out}",
        "prompts_per_step=2",
        "num_generations=2",
        "max_completion_length=4",
        "max_steps=2",
        "learning_rate=1e-3",
        "progress_bar=false",
        "reward_funcs=gsm8k",
        *extra,
    ]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl: step -> the numbers logged (None, a cleaned non-finite value, is not sent to trackers)."""
    return {
        r["step"]: {k: float(v) for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        for r in _jsonl(out / "metrics.jsonl")
    }


def _completions(out: Path) -> dict[int, list[str]]:
    by_step: dict[int, list[str]] = {}
    for r in _jsonl(out / "samples.jsonl"):
        by_step.setdefault(r["step"], []).append(r["completion"])
    return by_step


def _same(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], rel: float = 1e-9) -> None:
    assert sorted(got) == sorted(want)
    for step, metrics in want.items():
        assert sorted(got[step]) == sorted(metrics), step
        for k, v in metrics.items():
            assert math.isclose(got[step][k], v, rel_tol=rel, abs_tol=rel), (step, k, got[step][k], v)


def _tensorboard(out: Path) -> tuple[dict[int, dict[str, float]], dict[str, dict[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            assert tag not in scalars.get(e.step, {}), f"{tag} logged twice at step {e.step}"
            scalars.setdefault(e.step, {})[tag] = e.value
    texts = {
        tag.removesuffix("/text_summary"): {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
        for tag in acc.Tags()["tensors"]
    }
    return scalars, texts


def _wandb_records(run_dir: Path) -> list[dict]:
    """The run's .wandb transaction log, read by wandb's own inspector (`wandb leet inspect --json`)."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _wandb(out: Path, run_id: str) -> tuple[dict, dict[int, dict], list[Path]]:
    """(config, step -> history row, the run directories) of an offline run, resumed parts included."""
    run_dirs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert run_dirs, list((out / "wandb").iterdir())
    config, history = {}, {}
    for run_dir in run_dirs:
        for rec in _wandb_records(run_dir):
            if rec["type"] == "run":
                config.update(rec["run"]["config"]["update"])
            elif rec["type"] == "history":
                history[rec["history"]["step"].get("num", 0)] = {**rec["history"]["item"], "_dir": run_dir}
    return config, history, run_dirs


def _wandb_metrics(history: dict[int, dict]) -> dict[int, dict[str, float]]:
    return {step: {k: v for k, v in row.items() if not k.startswith(("_", "samples"))} for step, row in history.items()}


def _wandb_summary(run_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _mlflow(out: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    metrics: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            metrics.setdefault(m.step, {})[key] = m.value  # a resumed run's re-logged step: the later value
    return client, run, metrics


def _trackio(run_name: str) -> tuple[dict, dict[int, dict]]:
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    runs = [r for r in trackio.Api().runs("alignrl") if r.name == run_name]
    assert len(runs) == 1, runs
    logs: dict[int, dict] = {}
    for entry in SQLiteStorage.get_logs("alignrl", run_name):
        logs.setdefault(entry["step"], {}).update(entry)
    return runs[0].config, logs


def test_every_tracker_gets_metrics_config_and_samples(tiny_model, tmp_path, tracker_env, capsys):
    assert main(["train", "grpo", *_grpo_args(tiny_model, tmp_path), ALL]) == 0
    out = tmp_path / "run"
    want, completions = _expected(out), _completions(out)
    assert sorted(want) == [1, 2] and sorted(completions) == [1, 2]
    assert {"reward", "loss", "grad_norm"} <= set(want[2])
    ids = json.loads((out / "trackers.json").read_text())

    # tensorboard: scalars (float32), the config and a samples table as text
    scalars, texts = _tensorboard(out)
    _same(scalars, want, rel=1e-6)
    assert "learning_rate: 0.001" in texts["config"][0] and "algorithm: grpo" in texts["config"][0]
    assert sorted(texts["samples"]) == [1, 2]
    for step, completions_at in completions.items():
        table = texts["samples"][step]
        assert table.startswith("| step | prompt | completion | reward |")
        assert all(trackers._md_cell(c) in table for c in completions_at)

    # wandb (offline): history rows, config, a wandb.Table per logged step
    config, history, (run_dir,) = _wandb(out, ids["wandb"])
    _same(_wandb_metrics(history), want)
    assert config["learning_rate"] == 0.001 and config["algorithm"] == "grpo" and config["report_to"][-1] == "mlflow"
    for step, completions_at in completions.items():
        table = json.loads((run_dir / "files" / history[step]["samples.path"]).read_text())
        column = table["columns"].index("completion")
        assert [row[column] for row in table["data"]] == completions_at
    summary = _wandb_summary(run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0 and summary["name"] == "run"

    # mlflow (SQLite store in the output dir): metric histories, params, a table artifact per logged step
    client, run, metrics = _mlflow(out, ids["mlflow"])
    _same(metrics, want)
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["reward_funcs"] == '["gsm8k"]'
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for step, completions_at in completions.items():
        df = client.load_table(run.info.experiment_id, f"samples/step_{step}.json", run_ids=[run.info.run_id])
        assert df["completion"].tolist() == completions_at and set(df["step"]) == {step}

    # trackio (local store): logs per step, config, a trackio.Table per logged step
    config, logs = _trackio("run")
    assert config["learning_rate"] == 0.001
    got = {s: {k: v for k, v in row.items() if k not in ("step", "timestamp", "samples")} for s, row in logs.items()}
    _same(got, want)
    for step, completions_at in completions.items():
        assert [r["completion"] for r in logs[step]["samples"]["_value"]] == completions_at

    # nothing written outside tmp_path by the libraries' defaults (the trackio store is the session's tmp dir)
    assert not (Path.cwd() / "mlflow.db").exists() and not (Path.cwd() / "wandb").exists()


def test_report_to_parses_like_other_list_options(tiny_model, tmp_path):
    args = _grpo_args(tiny_model, tmp_path)
    for value in ("tensorboard,wandb", "[tensorboard, wandb]"):
        cfg = load_config(grpo.GRPOConfig, None, [*args, f"report_to={value}"])
        assert cfg.report_to == ["tensorboard", "wandb"]
    (tmp_path / "c.yaml").write_text("report_to: [jsonl, mlflow]\nrun_name: first\nproject: demo\n")
    cfg = load_config(grpo.GRPOConfig, str(tmp_path / "c.yaml"), args)
    assert (cfg.report_to, cfg.run_name, cfg.project) == (["jsonl", "mlflow"], "first", "demo")
    assert load_config(grpo.GRPOConfig, None, args).report_to == ["jsonl"]


def test_unknown_tracker_is_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(AlignRLError, match=r"^report_to: unknown tracker 'wandbb' \(choose from jsonl, tensorboard"):
        load_config(grpo.GRPOConfig, None, [*_grpo_args(tiny_model, tmp_path), "report_to=[jsonl,wandbb]"])
    assert main(["train", "grpo", *_grpo_args(tiny_model, tmp_path), "report_to=comet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "alignrl: error: report_to: unknown tracker 'comet' (choose from jsonl, tensorboard, wandb, trackio, mlflow)\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("tracker", "module"),
    [
        ("tensorboard", "tensorboard"),
        ("wandb", "wandb"),
        ("trackio", "trackio"),
        ("mlflow", "mlflow"),
        ("mlflow", "sqlalchemy"),
    ],
)
def test_missing_tracker_library_names_the_extra(tiny_model, tmp_path, monkeypatch, capsys, tracker, module):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    assert main(["train", "grpo", *_grpo_args(tiny_model, tmp_path), f"report_to={tracker}"]) == 2
    err = capsys.readouterr().err
    extra = f"pip install 'alignrl[{tracker}]'"
    assert err == f"alignrl: error: report_to: {tracker} needs the '{module}' package: {extra}\n"
    assert not (tmp_path / "run").exists()  # stopped before the output directory was touched


def test_trainer_error_still_closes_trackers(tiny_model, tmp_path, tracker_env):
    reward = tmp_path / "r.py"
    reward.write_text(
        "calls = []\n"
        "def fails_at_step_2(prompts, completions, **kw):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        raise RuntimeError('boom')\n"
        "    return [0.0] * len(completions)\n"
    )
    reports, rewards = "report_to=[tensorboard,wandb]", f"reward_funcs=[{reward}:fails_at_step_2]"
    args = _grpo_args(tiny_model, tmp_path, "run", reports, rewards)
    cfg = load_config(grpo.GRPOConfig, None, args)
    with pytest.raises(Exception, match="boom"):
        grpo.train(cfg)
    out = tmp_path / "run"
    assert sorted(_expected(out)) == [1]
    scalars, _ = _tensorboard(out)  # flushed and closed
    _same(scalars, _expected(out), rel=1e-6)
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    summary = _wandb_summary(run_dir)
    assert summary["exit_code"] == 1 and summary["state"] == "failed"
    assert trackers._OPEN == {}


def test_resume_continues_the_same_tracker_runs(tiny_model, tmp_path, tracker_env):
    reports = "report_to=[tensorboard,wandb,trackio,mlflow]"
    args = _grpo_args(tiny_model, tmp_path, "resumed", reports, "save_steps=1", "run_name=resumed")
    grpo.train(load_config(grpo.GRPOConfig, None, args))
    out = tmp_path / "resumed"
    ids = json.loads((out / "trackers.json").read_text())
    # resume from step 1 with one step more: steps 2 and 3 are (re)logged; what step 2 had before is replaced
    grpo.train(
        load_config(
            grpo.GRPOConfig,
            None,
            [*args, "max_steps=3", f"resume={out / 'checkpoint-1'}", "overwrite_output_dir=true"],
        )
    )
    assert json.loads((out / "trackers.json").read_text()) == ids
    want = _expected(out)
    assert sorted(want) == [1, 2, 3]
    scalars, _ = _tensorboard(out)  # the earlier run's step 2 purged
    _same(scalars, want, rel=1e-6)
    _, history, run_dirs = _wandb(out, ids["wandb"])
    assert len(run_dirs) == 2  # one offline directory per process, one run id: `wandb sync` joins them
    _same(_wandb_metrics(history), want)
    client, run, metrics = _mlflow(out, ids["mlflow"])
    _same(metrics, want)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    _, logs = _trackio("resumed")
    assert sorted(logs) == [1, 2, 3]


class _Recorder(trackers.Tracker):
    name = "recorder"
    modules = ()

    def __init__(self):
        self.calls = []

    def start(self, out, config, resumed_step):
        pass

    def log(self, step, metrics):
        self.calls.append(("log", step, metrics))

    def samples(self, step, columns, rows):
        self.calls.append(("samples", step, columns, rows))

    def close(self, failed):
        self.calls.append(("close", failed))


def test_rows_reach_trackers_as_numbers_and_tables(tmp_path):
    rec = _Recorder()
    group = trackers.Trackers(tmp_path, [rec])
    group.log(3, {"step": 3, "loss": 0.5, "reward": None, "tokens": 12, "nan": float("nan")})
    group.samples(3, [{"prompt": [{"role": "user", "content": "hi"}], "completion": "a|b"}, {"completion": "c"}])
    trackers.close_open(tmp_path, failed=True)
    group.close()  # once only
    assert rec.calls == [
        ("log", 3, {"loss": 0.5, "tokens": 12.0}),
        (
            "samples",
            3,
            ["step", "prompt", "completion"],
            [[3, '[{"role": "user", "content": "hi"}]', "a|b"], [3, None, "c"]],
        ),
        ("close", True),
    ]
    assert trackers._md_cell("a|b\n<c>") == "a\\|b<br>&lt;c&gt;"
    assert trackers._OPEN == {}
