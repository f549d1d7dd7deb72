"""`alignrl report`: the HTML page of runs, checked in headless Chromium (the page renders, every chart is drawn,
no console message, no request leaves the file, hostile text stays text, the screenshot is not blank) and without a
browser (bad input, overwriting, the embedded JSON).

The browser tests need Chromium (Debian: `apt-get install chromium`) and the `playwright` package (its driver only;
no `playwright install`); ALIGNRL_CHROMIUM=/path/to/chrome picks another browser. Where they are missing the tests
fail; ALIGNRL_SKIP_BROWSER=1 skips them instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hardening import _error

from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import write_jsonl
from alignrl.report import MAX_POINTS, Run, _thin, build_html, classify, load_run, make_report

HOSTILE = "</script><script>window.__pwned = 1; alert(1)</script><!-- <img src=x onerror=alert(2)>"
# what the issue asks the report to show, as GRPO names it
GRPO_CHARTED = ("reward", "rewards/gsm8k/mean", "rewards/digits/mean", "kl", "entropy", "clip/clipped", "loss",
                "completion_length/mean", "truncation_rate", "grad_norm", "lr", "time/generation",
                "eval/accuracy")  # fmt: skip
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
]  # fmt: skip


# ----------------------------------------------------------------------------- run directories


def _write_run(path: Path, algorithm: str, rows: list[dict], samples=(), config: str | None = "seed: 0\n") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (path / "alignrl_run.json").write_text(json.dumps({"algorithm": algorithm}))
    if config is not None:
        (path / "config.yaml").write_text(config)
    return path


def _synthetic(path: Path, scale: float, hostile: bool = False) -> Path:
    """A GRPO-like run: a null value (a gap), a metric logged once, one that is never finite, one not numeric."""
    rows = []
    for s in range(1, 21):
        row = {"step": s, "reward": scale * s / 20, "kl": None if s == 7 else 0.01 * s, "loss": 1 / s,
               "clip/low_clipped": 0.0, "clip/high_clipped": 0.01, "time/generation": 0.5, "time/update": 0.2,
               "step_time": 0.7, "rewards/none_applicable": None, "phase": "warmup" if s < 3 else "main"}  # fmt: skip
        if s == 1:
            row["truncated_examples"] = 3
        if s % 5 == 0:
            row["eval/accuracy"] = 0.1 * s / 5
        rows.append(row)
    samples = [{"step": s, "prompt": f"{s}+{s}=", "completion": str(2 * s), "reward": 1.0} for s in (1, 10, 20)]
    if hostile:
        samples.append({"step": 10, "prompt": [{"role": "user", "content": HOSTILE}], "completion": HOSTILE,
                        "reward": 0.0, "note": HOSTILE})  # fmt: skip
    config = f"model: {HOSTILE!r}\nlearning_rate: {scale}\n" if hostile else f"learning_rate: {scale}\n"
    return _write_run(path, "grpo", rows, samples, config)


@pytest.fixture(scope="module")
def real_runs(tiny_model, tmp_path_factory) -> list[Path]:
    """A few steps of SFT, GRPO (two reward functions, KL, held-out evaluation) and PPO on the tiny model."""
    from alignrl.trainers import grpo, ppo, sft

    root = tmp_path_factory.mktemp("runs")
    write_jsonl(root / "sft.jsonl", [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(40)])
    write_jsonl(root / "rl.jsonl", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(40)])
    (root / "rew.py").write_text("def digits(completions, **kw):\n    return [sum(c.isdigit() for c in t) / "
                                 "max(len(t), 1) for t in completions]\n")  # fmt: skip
    common = [f"model={tiny_model}", "progress_bar=false", "logging_steps=1", "max_steps=4"]
    rl = [f"train_file={root / 'rl.jsonl'}", f"eval_file={root / 'rl.jsonl'}", "eval_steps=2", "prompts_per_step=4",
          "num_generations=2", "max_completion_length=6", f"reward_funcs=[gsm8k,{root / 'rew.py'}:digits]"]  # fmt: skip
    sft.train(load_config(sft.SFTConfig, None, [*common, f"train_file={root / 'sft.jsonl'}",
                                                f"output_dir={root / 'sft'}", "eval_fraction=0.25", "eval_steps=2",
                                                "batch_size=8"]))  # fmt: skip
    grpo.train(load_config(grpo.GRPOConfig, None, [*common, *rl, f"output_dir={root / 'grpo'}", "beta=0.04"]))
    ppo.train(load_config(ppo.PPOConfig, None, [*common, *rl, f"output_dir={root / 'ppo'}"]))
    return [root / "grpo", root / "ppo", root / "sft"]


# ----------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("ALIGNRL_SKIP_BROWSER") == "1":
        pytest.skip("ALIGNRL_SKIP_BROWSER=1")
    chromium = os.environ.get("ALIGNRL_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        pytest.fail("the report's browser tests need Chromium and playwright: `apt-get install chromium` and `pip "
                    "install playwright` (`make test` does both), or ALIGNRL_SKIP_BROWSER=1 to skip them",
                    pytrace=False)  # fmt: skip
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)  # headless, fresh temporary profile
        yield b
        b.close()


# what the page drew: per chart its metrics and the line paths of its SVG (points, bounding box, colour)
_DRAWN = """() => [...document.querySelectorAll('.chart')].map(c => ({
    metrics: JSON.parse(c.dataset.metrics),
    svgs: c.querySelectorAll('svg:not(.key)').length,
    paths: [...c.querySelectorAll('.plot svg path.line')].map(p => {
        const b = p.getBBox();
        return {points: (p.getAttribute('d').match(/[ML]/g) || []).length, w: b.width, h: b.height,
                stroke: p.getAttribute('stroke')};
    }),
}))"""

# distinct colours of a PNG (given as base64), counted on a canvas of a blank page
_COLOURS = """async (b64) => {
    const img = new Image();
    img.src = 'data:image/png;base64,' + b64;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.width; c.height = img.height;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
    for (let i = 0; i < d.length && seen.size < 1000; i += 4 * 7) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    return seen.size;
}"""


def check_page(browser, path: Path) -> tuple[list[str], dict]:
    """Open a report as a file:// page; return what is wrong with it (console messages, page errors, dialogs,
    requests other than the file itself, charts not drawn) and what it drew."""
    import base64

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    url = path.resolve().as_uri()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: r.url == url or problems.append(f"request: {r.url}"))
    try:
        page.goto(url, wait_until="load")
        drawn = page.evaluate(_DRAWN)
        for i, chart in enumerate(drawn):
            lines = [p for p in chart["paths"] if p["points"] >= 2 and p["w"] > 0]
            if chart["svgs"] != 1 or not lines:
                problems.append(f"chart {i} {chart['metrics']}: not drawn ({chart})")
        if page.get_attribute("body", "data-rendered") != str(len(drawn)):
            problems.append(f"renderer did not finish: data-rendered={page.get_attribute('body', 'data-rendered')}")
        if page.evaluate("window.__pwned") is not None:
            problems.append("text from a run ran as a script")
        plots = page.locator(".chart .plot svg")
        if plots.count():
            plots.first.hover(timeout=5000)  # the tooltip must not throw either
            if page.locator("#tooltip").is_hidden():
                problems.append("no tooltip on hover")
        shot = page.screenshot()
        blank = context.new_page()
        colours = blank.evaluate(_COLOURS, base64.b64encode(shot).decode())
        info = {"charts": drawn, "text": page.inner_text("body"), "screenshot": shot, "colours": colours}
    finally:
        context.close()
    return problems, info


def _expected_charts(run_dirs: list[Path]) -> dict[str, set[str]]:
    """Per algorithm, the metrics some run logged with a finite value at two steps or more (read from the files
    here, not by the report's own code)."""
    out: dict[str, set[str]] = {}
    for d in run_dirs:
        counts: dict[str, int] = {}
        for line in (d / "metrics.jsonl").read_text().splitlines():
            for k, v in json.loads(line).items():
                if k != "step" and isinstance(v, (int, float)):
                    counts[k] = counts.get(k, 0) + 1
        algo = json.loads((d / "alignrl_run.json").read_text())["algorithm"]
        out.setdefault(algo, set()).update(k for k, n in counts.items() if n >= 2)
    return out


def test_report_of_real_runs_renders_in_chromium(browser, real_runs, tmp_path):
    out = make_report(real_runs, tmp_path / "report.html")
    problems, info = check_page(browser, out)
    assert problems == []
    expected = _expected_charts(real_runs)
    charted = [m for c in info["charts"] for m in c["metrics"]]
    assert len(charted) == len(set(charted)) or len(expected) > 1  # one chart per metric within an algorithm
    assert set(charted) == set().union(*expected.values())
    n_charts = sum(len({classify(m)[1] for m in names}) for names in expected.values())
    assert len(info["charts"]) == n_charts
    grpo = expected["grpo"]
    for m in GRPO_CHARTED:
        assert m in grpo, m
    assert {"objective/kl", "policy/clipfrac_avg", "eval/reward"} <= expected["ppo"]
    assert {"loss", "eval_loss"} <= expected["sft"]
    for heading in ("GRPO: grpo", "PPO: ppo", "SFT: sft", "Sample completions: grpo", "(first", "(middle", "(last",
                    "held-out evaluation samples", "Step time", "Clip fractions", "Evaluation"):  # fmt: skip
        assert heading in info["text"], heading
    assert info["screenshot"][:8] == b"\x89PNG\r\n\x1a\n" and info["colours"] > 10


def test_runs_overlaid_and_hostile_text_stays_text(browser, tmp_path):
    a = _synthetic(tmp_path / "a" / "run", 1.0, hostile=True)
    b = _synthetic(tmp_path / "b" / "run", 2.0)
    sft = _write_run(tmp_path / "sft", "sft", [{"step": s, "loss": 2 / s, "lr": 1e-3} for s in range(1, 6)])
    out = make_report([a, b, sft], tmp_path / "r.html")
    problems, info = check_page(browser, out)
    assert problems == []
    titles = [c["metrics"] for c in info["charts"]]
    # GRPO: reward, kl, loss, clip fractions (2 metrics), step time (3), eval/accuracy; SFT: loss, lr
    assert titles == [["reward"], ["kl"], ["clip/low_clipped", "clip/high_clipped"], ["loss"],
                      ["time/generation", "time/update", "step_time"], ["eval/accuracy"], ["loss"], ["lr"]]  # fmt: skip
    reward = info["charts"][0]["paths"]
    assert len(reward) == 2 and reward[0]["stroke"] != reward[1]["stroke"]  # two runs, two colours
    assert len(info["charts"][1]["paths"]) == 2  # the null at step 7 splits no path: each run is one path element
    assert len(info["charts"][4]["paths"]) == 6  # 3 metrics × 2 runs
    text = info["text"]
    assert text.count(HOSTILE) >= 3  # completion, prompt, extra column, shown as they are
    assert "a/run" in text and "b/run" in text
    assert "truncated_examples" in text and "Logged once" in text
    assert "rewards/none_applicable" in text and "phase" in text  # listed as not charted, not dropped silently
    assert "learning_rate" in text and "options that differ" in text


def test_the_check_fails_on_a_broken_renderer(browser, tmp_path):
    """The browser check itself: a renderer that throws, or draws nothing, is caught."""
    from alignrl.report import _asset

    js = _asset("report.js")
    run = _synthetic(tmp_path / "run", 1.0)
    broken = {
        "throws": js.replace("var e = extent(chart);", 'throw new Error("broken renderer"); var e = extent(chart);'),
        "draws nothing": js.replace('div.querySelector(".plot").appendChild(svg);', ""),
    }
    for name, bad in broken.items():
        assert bad != js, name
        page, _ = build_html([load_run(run)], js=bad)
        (tmp_path / "bad.html").write_text(page)
        problems, _ = check_page(browser, tmp_path / "bad.html")
        assert any("not drawn" in p for p in problems), (name, problems)
        if name == "throws":
            assert any("page error" in p and "broken renderer" in p for p in problems), problems


# ----------------------------------------------------------------------------- without a browser


def test_html_keeps_run_text_out_of_markup(tmp_path):
    page, _ = build_html([load_run(_synthetic(tmp_path / "run", 1.0, hostile=True))])
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the renderer only
    assert "<img" not in page and "<!-- <" not in page
    data = page.split('<script type="application/json" id="report-data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data and "&" not in data
    assert "default-src 'none'" in page  # nothing may be fetched when the file is viewed


def test_classify_groups_the_trainers_metrics():
    cases = {
        "reward": "Reward", "rewards/gsm8k/mean": "Reward", "objective/scores": "Reward", "rewards/chosen": "Reward",
        "kl": "KL", "objective/kl": "KL", "policy/approxkl_avg": "KL", "kl_coef": "KL",
        "entropy": "Entropy", "objective/entropy": "Entropy",
        "clip/high_clipped": "Clip fractions", "policy/clipfrac_avg": "Clip fractions",
        "val/clipfrac_avg": "Clip fractions", "completion_length/max": "Completions", "truncation_rate": "Completions",
        "eos_rate": "Completions", "loss": "Loss", "loss/value_avg": "Loss", "grad_norm": "Optimisation",
        "lr": "Optimisation", "time/generation": "Step time", "step_time": "Step time", "eval/accuracy": "Evaluation",
        "eval_loss": "Evaluation", "eval_rewards/margins": "Evaluation", "advantages/mean": "Other", "tokens": "Other",
        "skipped_update": "Other",
    }  # fmt: skip
    assert {m: classify(m)[0] for m in cases} == cases
    assert classify("clip/low_clipped")[1] == classify("clip/clipped")[1]  # one chart
    assert classify("time/update")[1] == classify("step_time")[1]


def test_long_series_are_thinned_keeping_the_last_point():
    points = [(s, float(s)) for s in range(1, 3 * MAX_POINTS + 2)]
    thin = _thin(points)
    assert len(thin) <= MAX_POINTS + 1 and thin[0] == [1, 1.0] and thin[-1] == [3 * MAX_POINTS + 1, 6001.0]


def test_cli_writes_the_report_and_prints_its_path(tmp_path, capsys):
    run = _synthetic(tmp_path / "run", 1.0)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(run)]) == 0  # its own report is replaced
    capsys.readouterr()
    out = tmp_path / "both.html"
    assert main(["report", str(run), str(_synthetic(tmp_path / "run2", 2.0)), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and "run2" in out.read_text()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    run = _synthetic(tmp_path / "run", 1.0)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no metrics.jsonl" in _error(capsys)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in _error(capsys)
    assert main(["report", str(run), str(run)]) == 2
    assert "--out: name the report file" in _error(capsys)
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    assert main(["report", str(run), "--out", str(notes)]) == 2
    assert "is not an alignrl report (--force replaces it)" in _error(capsys)
    assert notes.read_text() == "<html>my notes</html>"
    assert main(["report", str(run), "--out", str(notes), "--force"]) == 0
    assert main(["report", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in _error(capsys)


def test_torn_and_invalid_lines_are_skipped_with_a_warning(tmp_path, capsys):
    run = _synthetic(tmp_path / "run", 1.0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('[1, 2]\n{"step": "x"}\n{"step": 21, "rew')  # killed mid-write
    (run / "samples.jsonl").write_text('{"step": 1, "prompt": "p", "completion": "c"}\n\xff not json\n')
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"alignrl: warning: {run / 'metrics.jsonl'}:21: not an object" in err
    assert f"{run / 'metrics.jsonl'}:22: not an object" in err
    assert f"{run / 'metrics.jsonl'}:23: not valid JSON, skipped" in err
    assert f"{run / 'samples.jsonl'}:2: not valid JSON, skipped" in err
    assert load_run(run).rows == 20


def test_a_run_without_config_or_samples_or_rows(tmp_path):
    run = _write_run(tmp_path / "run", "dpo", [], config=None)
    (run / "samples.jsonl").unlink()
    page, charts = build_html([load_run(run)])
    assert charts == [] and "no metrics logged yet" in page and "no config.yaml" in page
    assert isinstance(load_run(run), Run)


def test_report_command_imports_neither_torch_nor_transformers(tmp_path):
    run = _synthetic(tmp_path / "run", 1.0)
    code = ("import sys; from alignrl.cli import main; rc = main(['report', sys.argv[1]]); "
            "sys.exit(rc or any(m in sys.modules for m in ('torch', 'transformers')))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True).returncode == 0


def test_demo_report_holds_the_demo_runs(tmp_path):
    from alignrl.demo import write_report

    _write_run(tmp_path / "sft", "sft", [{"step": s, "loss": 1 / s} for s in range(1, 4)])
    _synthetic(tmp_path / "grpo", 1.0)
    path = write_report(tmp_path, "grpo")
    assert path == tmp_path / "report-grpo.html"
    page = path.read_text()
    assert "SFT: sft" in page and "GRPO: grpo" in page and "alignrl demo --algo grpo" in page
