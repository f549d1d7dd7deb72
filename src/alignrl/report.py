"""`alignrl report RUN_DIR [RUN_DIR ...] [--out FILE.html]`: one self-contained HTML file describing training runs.

The page holds the runs' configs, their curves (one chart per metric, or per family for clip fractions, completion
length and the step time split, with every run of the same algorithm overlaid in its own colour) and sample
completions from the first, middle and last logged steps. The data is embedded as JSON and drawn as SVG by a small
renderer (`report.js`, no libraries); a Content-Security-Policy forbids every network request and any script but
that renderer, so the file views offline and text from the runs (prompts, completions, configs) can only be text.

Runs are grouped by algorithm (`alignrl_run.json`): runs of one algorithm share their charts, those of another get
their own. Every numeric metric of `metrics.jsonl` lands somewhere: a chart when some run logged it at two steps or
more, the "logged once" table otherwise; metrics with no finite value or with non-numeric values are listed by name.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alignrl.errors import AlignRLError

GENERATOR = '<meta name="generator" content="alignrl report">'  # marks a file this command may overwrite
MAX_POINTS = 2000  # per series; longer series are thinned to every k-th point (the last one kept)
SAMPLE_ROWS = 8  # sample completions shown per run and step
# Tableau 10: one colour per run, in the order the runs are given
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")  # fmt: skip
DASHES = ("", "7 4", "2 3", "9 3 2 3", "1 6")  # one per metric of a chart with several (report.js uses the same)
SECTIONS = ("Reward", "KL", "Entropy", "Clip fractions", "Completions", "Loss", "Optimisation", "Step time",
            "Evaluation", "Other")  # fmt: skip


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    algorithm: str
    label: str = ""
    # metric -> [(step, value)] in step order; None where the value was null or not finite
    metrics: dict[str, list[tuple[int, float | None]]] = field(default_factory=dict)
    non_numeric: list[str] = field(default_factory=list)  # metrics with a value that is not a number
    samples: list[dict[str, Any]] = field(default_factory=list)
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    rows: int = 0  # metrics.jsonl rows read
    index: int = 0  # position and colour in the report (build_html sets them)
    color: str = ""


@dataclass
class Chart:
    title: str
    section: str
    metrics: list[str]


def classify(name: str) -> tuple[str, str]:
    """(section, chart title) of a metric; metrics with the same title share a chart."""
    n = name.lower()
    if n.startswith(("eval/", "eval_")):
        return "Evaluation", name
    if n.startswith("time/") or n == "step_time":
        return "Step time", "step time split (s)"
    if "clip" in n:
        return "Clip fractions", "clip fractions"
    if "kl" in n:
        return "KL", name
    if "entropy" in n:
        return "Entropy", name
    if "reward" in n or n.startswith("objective/") or n in ("accuracy", "margin"):
        return "Reward", name
    if n.startswith("completion_length"):
        return "Completions", "completion length (tokens)"
    if n.startswith(("truncat", "eos_")):
        return "Completions", name
    if n == "loss" or n.startswith("loss/") or n.endswith("_loss"):
        return "Loss", name
    if n in ("grad_norm", "lr", "learning_rate"):
        return "Optimisation", name
    return "Other", name


def _warn(msg: str) -> None:
    print(f"alignrl: warning: {msg}", file=sys.stderr)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file that are objects with an integer "step"; any other line (a torn last line of a killed
    run, say) is skipped with a warning naming file:line."""
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            _warn(f"{path}:{i}: not valid JSON, skipped")
            continue
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            _warn(f'{path}:{i}: not an object with an integer "step", skipped')
            continue
        rows.append(row)
    return rows


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory (metrics.jsonl required; samples.jsonl, config.yaml, alignrl_run.json optional)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise AlignRLError(f"{run_dir}: not a directory")
    if not (path / "metrics.jsonl").is_file():
        raise AlignRLError(f"{run_dir}: no metrics.jsonl (not an alignrl run directory)")
    algorithm = "unknown"
    if (path / "alignrl_run.json").is_file():
        try:
            algorithm = str(json.loads(_read_text(path / "alignrl_run.json"))["algorithm"])
        except (ValueError, KeyError, TypeError):
            _warn(f"{path / 'alignrl_run.json'}: unreadable, algorithm unknown")
    run = Run(path=path, algorithm=algorithm)
    rows = sorted(read_jsonl(path / "metrics.jsonl"), key=lambda r: r["step"])
    run.rows = len(rows)
    for row in rows:
        for k, v in row.items():
            if k == "step":
                continue
            if v is None or isinstance(v, (int, float)):
                v = None if v is None or not math.isfinite(v) else float(v)
                run.metrics.setdefault(k, []).append((row["step"], v))
            elif k not in run.non_numeric:
                run.non_numeric.append(k)
    if (path / "samples.jsonl").is_file():
        run.samples = read_jsonl(path / "samples.jsonl")
    if (path / "config.yaml").is_file():
        run.config_text = _read_text(path / "config.yaml")
        try:
            config = yaml.safe_load(run.config_text)
            run.config = config if isinstance(config, dict) else {}
        except yaml.YAMLError:
            _warn(f"{path / 'config.yaml'}: not valid YAML, shown as text only")
    return run


def _labels(paths: list[Path]) -> list[str]:
    """Shortest distinct path tails: `grpo`, or `a/run` and `b/run` when two runs share a directory name; a
    directory given twice is told apart by a count, `grpo (2)`."""
    parts = [p.resolve().parts for p in paths]
    distinct = set(parts)
    depth = dict.fromkeys(distinct, 1)
    while True:
        tails = {p: str(Path(*p[-depth[p] :])) for p in distinct}
        clash = [p for p in distinct if list(tails.values()).count(tails[p]) > 1 and depth[p] < len(p)]
        if not clash:
            break
        for p in clash:
            depth[p] += 1
    labels, seen = [], dict.fromkeys(distinct, 0)
    for p in parts:
        seen[p] += 1
        labels.append(tails[p] + (f" ({seen[p]})" if seen[p] > 1 else ""))
    return labels


def _thin(points: list[tuple[int, float | None]]) -> list[list[Any]]:
    if len(points) > MAX_POINTS:
        k = math.ceil(len(points) / MAX_POINTS)
        points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return [[s, None if v is None else float(f"{v:.6g}")] for s, v in points]


def plan_charts(runs: list[Run]) -> tuple[list[Chart], list[str], list[str]]:
    """The charts of a group of runs (sections in SECTIONS order, metrics in first-logged order), the metrics
    logged at one step only, and those with no finite value."""
    names: list[str] = []
    for run in runs:
        names += [k for k in run.metrics if k not in names]
    charts: dict[str, Chart] = {}
    once, empty = [], []
    for name in names:
        finite = max(sum(v is not None for _, v in run.metrics.get(name, [])) for run in runs)
        if finite == 0:
            empty.append(name)
        elif finite == 1:
            once.append(name)
        else:
            section, title = classify(name)
            charts.setdefault(title, Chart(title, section, [])).metrics.append(name)
    # by section; within one, spreads and counts (…std, none_applicable) after the means, else first-logged order
    secondary = ("std", "none_applicable")
    ordered = sorted(charts.values(), key=lambda c: (SECTIONS.index(c.section), c.metrics[0].endswith(secondary)))
    return ordered, once, empty


def _json_for_script(data: Any) -> str:
    """JSON safe inside <script>: no `<`, `>` or `&` at all, so no `</script>` or `<!--` either."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return resources.files("alignrl").joinpath(name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    """A prompt or completion as text: chat messages one per line, other structures as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"[{m.get('role', '?')}] {_text(m['content'])}" for m in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, ensure_ascii=False)


def _pre(value: Any) -> str:
    return f"<pre>{html.escape(_text(value))}</pre>"


def _key(color: str, dash: str = "") -> str:
    return (f'<svg class="key" width="22" height="10"><line x1="1" y1="5" x2="21" y2="5" stroke="{color}" '
            f'stroke-width="2.5" stroke-dasharray="{dash}"/></svg>')  # fmt: skip


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; `head` is escaped here, the cells are HTML already."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _sample_steps(steps: list[int]) -> list[tuple[str, int]]:
    picks = [("first", steps[0]), ("middle", steps[len(steps) // 2]), ("last", steps[-1])] if steps else []
    out: list[tuple[str, int]] = []
    for name, s in picks:
        if out and out[-1][1] == s:
            out[-1] = (f"{out[-1][0]}, {name}", s)
        elif all(s != t for _, t in out):
            out.append((name, s))
    return out


def _samples_html(run: Run) -> str:
    if not run.samples:
        return "<p class=note>no sample completions logged (samples.jsonl is empty or absent)</p>"
    parts = []
    for kind, is_eval in (("training", False), ("held-out evaluation", True)):
        rows = [r for r in run.samples if bool(r.get("eval")) == is_eval]
        steps = sorted({r["step"] for r in rows})
        for which, step in _sample_steps(steps):
            at = [r for r in rows if r["step"] == step]
            extra = [k for k in dict.fromkeys(k for r in at for k in r) if k not in
                     ("step", "eval", "prompt", "completion", "reward")]  # fmt: skip
            head = ["prompt", "completion", "reward", *extra]
            cells = [[_pre(r.get(k, "")) for k in head] for r in at[:SAMPLE_ROWS]]
            shown = f"{len(cells)} of {len(at)}" if len(at) > len(cells) else str(len(at))
            parts.append(f"<h4>{kind} samples, step {step} ({which}; {shown})</h4>")
            parts.append(_table(head, cells, "samples"))
    return "\n".join(parts)


def _config_html(runs: list[Run]) -> str:
    parts = []
    if len(runs) > 1:
        keys = list(dict.fromkeys(k for r in runs for k in r.config))
        missing = object()

        def show(v: Any) -> str:
            return "—" if v is missing else html.escape(json.dumps(v, ensure_ascii=False, default=str))

        differ = [k for k in keys if len({show(r.config.get(k, missing)) for r in runs}) > 1]
        if differ:
            rows = [[f"<code>{html.escape(k)}</code>", *(show(r.config.get(k, missing)) for r in runs)] for k in differ]
            parts.append("<h4>options that differ</h4>" + _table(["option", *(r.label for r in runs)], rows, "config"))
    for r in runs:
        body = _pre(r.config_text) if r.config_text is not None else "<p class=note>no config.yaml</p>"
        parts.append(f"<details><summary>{_key(r.color)}{html.escape(r.label)}: config.yaml</summary>{body}</details>")
    return "\n".join(parts)


def _charts_html(runs: list[Run], charts: list[Chart], data_charts: list[dict[str, Any]]) -> str:
    """The chart containers, one block per section; appends each chart's series to `data_charts`."""
    parts, section = [], None
    for chart in charts:
        if chart.section != section:
            parts.append("</div></div>" if section else "<div class=sections>")
            parts.append(f"<div class=section><h3>{chart.section}</h3><div class=grid>")
            section = chart.section
        series, legend = [], []
        for r in runs:
            for j, m in enumerate(chart.metrics):
                if m in r.metrics:
                    label = r.label + (f" · {m}" if len(chart.metrics) > 1 else "")
                    dash = j % len(DASHES)
                    series.append({"run": r.index, "label": label, "dash": dash, "points": _thin(r.metrics[m])})
                    legend.append(f"<span>{_key(r.color, DASHES[dash])}{html.escape(label)}</span>")
        metrics = html.escape(json.dumps(chart.metrics))
        parts.append(
            f'<div class="chart" data-chart="{len(data_charts)}" data-metrics="{metrics}">'
            f"<h4>{html.escape(chart.title)}</h4><div class=plot></div>"
            f"<div class=legend>{''.join(legend) if len(series) > 1 else ''}</div></div>"
        )
        data_charts.append({"title": chart.title, "series": series})
    return "".join(parts) + ("</div></div></div>" if section else "")


def _group_html(algorithm: str, runs: list[Run], data_charts: list[dict[str, Any]]) -> tuple[str, list[Chart]]:
    """The section of the runs of one algorithm: charts, single values, configs, sample completions."""
    charts, once, empty = plan_charts(runs)
    heading = f"{algorithm.upper()}: {', '.join(r.label for r in runs)}"
    parts = [f"<section class=group><h2>{html.escape(heading)}</h2>"]
    if not charts and not once:
        parts.append("<p class=note>no metrics logged yet</p>")
    parts.append(_charts_html(runs, charts, data_charts))
    if once:
        rows = [[f"<code>{html.escape(m)}</code>", *(_once(r, m) for r in runs)] for m in once]
        parts.append("<h3>Logged once</h3>" + _table(["metric", *(r.label for r in runs)], rows, "once"))
    non_numeric = list(dict.fromkeys(m for r in runs for m in r.non_numeric))
    for names, why in ((empty, "no finite value (null, NaN or infinite at every step)"),
                       (non_numeric, "values that are not numbers")):  # fmt: skip
        if names:
            listed = ", ".join(f"<code>{html.escape(m)}</code>" for m in names)
            parts.append(f"<p class=note>Not charted, {why}: {listed}</p>")
    parts.append("<h3>Config</h3>" + _config_html(runs))
    for r in runs:
        parts.append(f"<h3>{_key(r.color)}Sample completions: {html.escape(r.label)}</h3>{_samples_html(r)}")
    parts.append("</section>")
    return "\n".join(parts), charts


def _runs_table(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        steps = sorted({s for pts in r.metrics.values() for s, _ in pts})
        logged = f"{steps[0]}–{steps[-1]} ({r.rows} rows)" if steps else "none"
        rows.append([f"{_key(r.color)}{html.escape(r.label)}", html.escape(r.algorithm),
                     f"<code>{html.escape(str(r.path.resolve()))}</code>", html.escape(str(r.config.get("model", ""))),
                     logged, str(len(r.samples))])  # fmt: skip
    return _table(["run", "algorithm", "directory", "model", "steps logged", "samples"], rows, "runs")


def build_html(runs: list[Run], title: str | None = None, js: str | None = None) -> tuple[str, list[Chart]]:
    """The report page of `runs` and the charts it draws (`js` replaces the renderer: tests break it on purpose).
    Runs of one algorithm share their charts; each algorithm has its own section."""
    js = _asset("report.js") if js is None else js
    for i, (r, label) in enumerate(zip(runs, _labels([r.path for r in runs]))):
        r.index, r.color, r.label = i, PALETTE[i % len(PALETTE)], r.label or label
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.algorithm, []).append(r)
    data_charts: list[dict[str, Any]] = []
    body, charts = [], []
    for algorithm, group in groups.items():
        text, group_charts = _group_html(algorithm, group, data_charts)
        body.append(text)
        charts += group_charts
    title = title or "alignrl report: " + ", ".join(r.label for r in runs)
    data = {"runs": [{"label": r.label, "color": r.color} for r in runs], "charts": data_charts}
    # only this renderer may run (its hash), nothing may be fetched: offline, and run text can only be text
    sha = base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{sha}'"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{GENERATOR}
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
{_asset("report.css")}
</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><p class=note>written {now} by <code>alignrl report</code></p></header>
{_runs_table(runs)}
{"".join(body)}
<div id="tooltip" hidden></div>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{js}</script>
</body>
</html>
"""
    return page, charts


def _once(run: Run, metric: str) -> str:
    values = [(s, v) for s, v in run.metrics.get(metric, []) if v is not None]
    return f"{values[0][1]:.6g} <span class=note>(step {values[0][0]})</span>" if values else "—"


def is_report(path: Path) -> bool:
    """Whether `path` is a file this command wrote (and may therefore replace)."""
    try:
        with path.open("rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def make_report(
    run_dirs: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    force: bool = False,
    title: str | None = None,
) -> Path:
    """Write the report of `run_dirs` to `out` (default: RUN_DIR/report.html for one run) and return its path.
    An existing file is replaced only if it is an alignrl report, or with `force`."""
    if not run_dirs:
        raise AlignRLError("report: name at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        if len(runs) > 1:
            raise AlignRLError("--out: name the report file (several runs)")
        out = runs[0].path / "report.html"
    out = Path(out)
    if out.is_dir():
        raise AlignRLError(f"--out: {out} is a directory")
    if out.exists() and not force and not is_report(out):
        raise AlignRLError(f"--out: {out} exists and is not an alignrl report (--force replaces it)")
    if not out.parent.is_dir():
        raise AlignRLError(f"--out: {out.parent} is not a directory")
    page, _ = build_html(runs, title)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it private)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
