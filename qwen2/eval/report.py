"""One Markdown table and one PNG from benchmark summaries: each benchmark (and metric) by model, each
cell the score with its 95 % interval and the number of items, and the published figure beside.

The inputs are the `NAME.summary.json` files the runners write (or their results JSONL, whose summary
lies beside it): `{"benchmark", "model", "items", METRIC: {"mean", "stderr", "low", "high", "n"}, ...,
"settings"}`. Any such metric is shown, the benchmark's headline metric first (the summary's
"headline" when it names one, else its first metric); a metric of metrics is shown one row per inner
metric; a `METRIC_macro` average over groups is shown without an interval; breakdowns by group
(`..._by_subject`, MT-Bench's `by_category`) stay in the summaries, as they would swamp the table.
HumanEval's summary (`problems`, `passed`, `pass@k`) is read too. A run of another engine on the same
prompts (llama.cpp) is a summary like the others whose `model` names it, so it gets its own column.

Published figures (`published.py`) go in one column per published model. A figure is printed plainly
when every run of that model on the benchmark scored the published item set; otherwise (the offline
packs are exemplars or generated prompts, or `--limit` cut the set) it is printed with "(subset)":
still shown, because the gap to it is what a reader wants explained, but marked as not like for like.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import Qwen2Error
from ..fileio import atomic_file, read_text, write_text_atomic
from . import published as pub
from .results import mean_interval, summary_path

# Benchmarks scored on a rating scale (1-10), never shown as percentages even when a mean is <= 1.
RATING_BENCHMARKS = {"mtbench"}
# The headline metric of benchmarks whose summary names none and does not list it first (MT-Bench's
# summary has turn 1, turn 2, then both turns).
HEADLINES = {"mtbench": "overall"}
MISSING = "–"


@dataclass
class Run:
    """One benchmark run of one model, as its summary file says."""
    path: str
    benchmark: str
    model: str
    items: int
    metrics: dict[str, dict]  # name -> {"mean", "low", "high", "n"} (low/high None: no interval)
    headline: str
    settings: dict = field(default_factory=dict)

    @property
    def on_published_items(self) -> bool:
        return pub.on_published_items(self.benchmark, self.items, self.settings)


# ---- reading summaries --------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_metric(value) -> bool:
    return (isinstance(value, dict) and _is_number(value.get("mean")) and _is_number(value.get("n"))
            and all(value.get(k) is None or _is_number(value.get(k)) for k in ("low", "high")))


def _metric(value: dict) -> dict:
    return {"mean": float(value["mean"]), "low": value.get("low"), "high": value.get("high"), "n": int(value["n"])}


def _metrics_of(summary: dict) -> dict[str, dict]:
    """Every metric of a runner's summary, in the summary's order."""
    metrics: dict[str, dict] = {}
    for key, value in summary.items():
        if key == "settings":
            continue
        if _is_metric(value):
            metrics[key] = _metric(value)
        elif "by_" in key:
            continue  # a breakdown by subject, task or category: too many rows for one table
        elif isinstance(value, dict) and value and all(_is_metric(v) for v in value.values()):
            for inner, v in value.items():  # a metric of metrics: one row each
                metrics[f"{key}/{inner}"] = _metric(v)
        elif key.endswith("_macro") and _is_number(value):
            # A macro average over groups (subjects, tasks): the groups are its `n`; no interval.
            groups = next((v for k, v in summary.items() if k.startswith(key[:-len("macro")] + "by_")
                           and isinstance(v, dict)), {})
            metrics[key] = {"mean": float(value), "low": None, "high": None, "n": len(groups), "groups": True}
    return metrics


def _humaneval_run(path: str, summary: dict, results_path: str | None) -> Run:
    """A HumanEval summary (`problems`, `samples`, `passed`, `pass@k`) as a Run. Greedy runs (one
    sample a problem) get pass@1's interval from the pass count; sampled runs get each pass@k's
    interval from the per-problem estimates in the results file beside, when it is there."""
    from .humaneval import pass_at_k

    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    problems, samples, passed = (summary.get(k) for k in ("problems", "samples", "passed"))
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (problems, samples, passed)) or problems < 1:
        raise Qwen2Error(f"{path} looks like a HumanEval summary but has no whole problems/samples/passed counts; "
                         "give the summary `qwen2 eval humaneval` wrote")
    ks = [k for k in summary if k.startswith("pass@") and _is_number(summary[k])]
    per_problem: dict[str, list[bool]] = {}
    if samples != problems and results_path and os.path.exists(results_path):
        for number, line in enumerate(read_text(results_path).splitlines(), 1):
            try:
                record = json.loads(line)
                per_problem.setdefault(record["task_id"], []).append(bool(record["passed"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise Qwen2Error(f"{results_path} line {number} is not a HumanEval result record; "
                                 "give the results file `qwen2 eval humaneval` wrote") from None
    metrics = {}
    for name in ks:
        k = int(name[len("pass@"):])
        if samples == problems and k == 1:  # one sample each: pass@1 is the pass rate of 0/1 outcomes
            metrics[name] = _metric(mean_interval([1.0] * passed + [0.0] * (problems - passed)))
        elif len(per_problem) == problems:
            metrics[name] = _metric(mean_interval([pass_at_k(len(v), sum(v), k) for v in per_problem.values()]))
        else:
            metrics[name] = {"mean": float(summary[name]), "low": None, "high": None, "n": problems}
    if not metrics:
        raise Qwen2Error(f"{path} is a HumanEval summary without any pass@k; the run has not finished")
    return Run(path, "humaneval", str(settings.get("model", "")), problems, metrics, next(iter(metrics)), settings)


def read_run(path: str | os.PathLike) -> Run:
    """The Run a summary file (or the results JSONL it is beside) holds; anything else is a
    one-line error naming the file."""
    path = os.fspath(path)
    results_path = None
    if path.endswith(".jsonl"):
        results_path, path = path, summary_path(path)
        if not os.path.exists(path):
            raise Qwen2Error(f"{results_path} has no summary beside it ({path}): the run has not finished; "
                             "run the same command again to resume it, which writes the summary")
    elif path.endswith(".summary.json"):
        results_path = path[:-len(".summary.json")] + ".jsonl"
    text = read_text(path)
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise Qwen2Error(f"{path} is not a benchmark summary: not JSON ({e.msg}, line {e.lineno}); "
                         "give the NAME.summary.json a `qwen2 eval` run wrote, or its results JSONL") from None
    if not isinstance(summary, dict):
        raise Qwen2Error(f"{path} is not a benchmark summary (a JSON {type(summary).__name__}, not an object)")
    if "benchmark" not in summary and "problems" in summary and any(k.startswith("pass@") for k in summary):
        return _humaneval_run(path, summary, results_path)
    if not isinstance(summary.get("benchmark"), str) or not summary["benchmark"]:
        raise Qwen2Error(f"{path} is not a benchmark summary: it names no \"benchmark\"; give the NAME.summary.json "
                         "a `qwen2 eval` run wrote, or its results JSONL")
    metrics = _metrics_of(summary)
    if not metrics:
        raise Qwen2Error(f"{path} has no scored metric (no METRIC: {{\"mean\", \"n\", ...}} in it): nothing was "
                         "scored in that run, or it is not a benchmark summary")
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    if summary.get("judge") and "judge" not in settings:
        settings = {**settings, "judge": summary["judge"]}
    model = summary.get("model") or settings.get("model") or ""
    headline = summary.get("headline", HEADLINES.get(pub.benchmark_key(summary["benchmark"])))
    headline = headline if headline in metrics else next(iter(metrics))
    items = next((summary[k] for k in ("items", "questions") if isinstance(summary.get(k), int)
                  and not isinstance(summary[k], bool)), None)
    if items is None:
        items = max(m["n"] for m in metrics.values())
    return Run(path, summary["benchmark"], str(model), items, metrics, headline, settings)


def read_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """The runs of all files; two files with the same benchmark and model are refused (which of
    them would the table show?)."""
    if not paths:
        raise Qwen2Error("no summaries given: name the NAME.summary.json files (or results JSONL) to report")
    runs, seen = [], {}
    for path in paths:
        run = read_run(path)
        key = (pub.benchmark_key(run.benchmark), run.model)
        if key in seen:
            raise Qwen2Error(f"{seen[key]} and {run.path} are both {run.benchmark} of "
                             f"{run.model or 'an unnamed model'}; give only one of them")
        seen[key] = run.path
        runs.append(run)
    return runs


# ---- the table ----------------------------------------------------------------------------------

@dataclass
class Row:
    benchmark: str
    metric: str
    headline: bool
    percent: bool                                       # proportions, shown as percentages
    cells: dict[str, dict] = field(default_factory=dict)  # model -> metric
    runs: dict[str, Run] = field(default_factory=dict)    # model -> its run of this benchmark


def rows_of(runs: Sequence[Run]) -> list[Row]:
    """One row per benchmark and metric, benchmarks in the order first given, headline metric first."""
    by_benchmark: dict[str, list[Run]] = {}
    for run in runs:
        by_benchmark.setdefault(pub.benchmark_key(run.benchmark), []).append(run)
    rows = []
    for group in by_benchmark.values():
        headline = group[0].headline
        names = [headline] + [m for run in group for m in run.metrics if m != headline]
        for metric in dict.fromkeys(names):
            values = [run.metrics[metric] for run in group if metric in run.metrics]
            percent = pub.benchmark_key(group[0].benchmark) not in RATING_BENCHMARKS and all(
                0.0 <= x <= 1.0 for v in values for x in (v["mean"], v["low"], v["high"]) if x is not None)
            rows.append(Row(group[0].benchmark, metric, metric == headline, percent,
                            {run.model: run.metrics[metric] for run in group if metric in run.metrics},
                            {run.model: run for run in group}))
    return rows


def column_labels(models: Sequence[str]) -> dict[str, str]:
    """Short column names: the last part of a path or repository id, keeping a runner prefix
    ("llama.cpp:"); the full names where two short ones would be the same."""
    def short(model: str) -> str:
        head, sep, tail = model.partition(":")
        if sep and "/" not in head and tail:
            return f"{head}:{short(tail)}"
        return os.path.basename(model.rstrip("/\\")) or model or "(unnamed model)"

    labels = {m: short(m) for m in models}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {m: (label if counts[label] == 1 else (m or "(unnamed model)")) for m, label in labels.items()}


def _number(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def format_cell(metric: dict, percent: bool) -> str:
    """"score [low, high] (n)"; percentages for proportions; "(n groups)" for a macro average."""
    text = _number(metric["mean"], percent)
    if metric.get("low") is not None and metric.get("high") is not None:
        text += f" [{_number(metric['low'], percent)}, {_number(metric['high'], percent)}]"
    return text + (f" ({metric['n']} groups)" if metric.get("groups") else f" ({metric['n']})")


def published_columns(rows: Sequence[Row], models: Sequence[str], figures) -> dict[str, list[str]]:
    """Published model name -> the table's models it was published for (a model and llama.cpp's
    run of it share one published column); only models with a figure for some row."""
    columns: dict[str, list[str]] = {}
    for model in models:
        for figure in pub.figures_for(model, figures):
            if model not in columns.setdefault(figure.model, []):
                columns[figure.model].append(model)
    return {name: its_models for name, its_models in columns.items()
            if any(published_cell(row, name, its_models, figures)[1] for row in rows)}


def published_cell(row: Row, name: str, models: Sequence[str], figures) -> tuple[str, pub.PublishedFigure | None]:
    """The published figure of model `name` for this row ("" when none applies), marked "(subset)"
    unless every run of it scored the published item set."""
    runs = [row.runs[m] for m in models if m in row.runs]
    if not runs:
        return "", None
    key = pub.benchmark_key(row.benchmark)
    for figure in pub.figures_for(runs[0].model, figures):
        if figure.model == name and pub.benchmark_key(figure.benchmark) == key and (
                figure.metric == row.metric if figure.metric else row.headline):
            value = f"{figure.value:.1f}" if row.percent else f"{figure.value:.2f}"
            return (value if all(r.on_published_items for r in runs) else f"{value} (subset)"), figure
    return "", None


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(runs: Sequence[Run], figures=pub.FIGURES) -> str:
    """The report: the table, what its cells mean, the sources of the published figures, the inputs."""
    rows = rows_of(runs)
    models = list(dict.fromkeys(run.model for run in runs))
    labels = column_labels(models)
    pubs = published_columns(rows, models, figures)
    header = ["benchmark", "metric"] + [labels[m] for m in models] + [f"published {p}" for p in pubs]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    used: dict[pub.PublishedFigure, None] = {}
    for row in rows:
        cells = [row.benchmark if row.headline else "", row.metric]
        cells += [format_cell(row.cells[m], row.percent) if m in row.cells else MISSING for m in models]
        for name, its_models in pubs.items():
            text, figure = published_cell(row, name, its_models, figures)
            cells.append(text or MISSING)
            if figure:
                used[figure] = None
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    notes = ["", "Each cell: the score [95 % interval of the mean] (n: the scores averaged: items; instructions "
             "for IFEval's instruction-level metrics; parsed ratings for MT-Bench). Proportions are in percent, "
             "ratings (MT-Bench) on their 1-10 scale; the interval is mean ± 1.96 standard errors "
             "(lm-eval's stderr), clipped to the scale. A macro average over groups has no interval.",
             "Published: the figure the paper reports for that model. Marked (subset) where our run did not "
             "score the published item set (the offline pack's exemplars or generated prompts, or a --limit): "
             "shown for reference, not as a like-for-like comparison."]
    if used:
        notes += ["", "Sources of the published figures:"]
        notes += [f"- {f.model}, {f.benchmark}: {f.value:g} — {f.source}" for f in used]
    notes += ["", "Inputs:"]
    for run in runs:
        s = run.settings
        data = ("the offline pack" if s.get("data") is None else f"data {s['data']}") if "data" in s else ""
        details = ", ".join(x for x in [
            f"{run.items} items", data, "shots" in s and f"{s['shots']}-shot",
            "chat" in s and ("chat" if s["chat"] else "base prompt"), s.get("judge") and f"judged by {s['judge']}"]
            if x)
        notes.append(f"- `{run.path}`: {run.benchmark}, {run.model or '(unnamed model)'} ({details})")
    return "\n".join(lines + notes) + "\n"


# ---- the chart ----------------------------------------------------------------------------------

def plot(runs: Sequence[Run], path: str | os.PathLike, figures=pub.FIGURES) -> None:
    """A grouped bar chart of the headline metrics: one group per benchmark, one bar per model with
    its 95 % interval as an error bar, and a hatched bar per published figure ("*" on a benchmark:
    the published figure is on the full test set, our runs on a subset). Proportions and ratings
    get separate panels."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise Qwen2Error("the report's chart needs matplotlib: pip install matplotlib (or give --no-png)") from None
    rows = [row for row in rows_of(runs) if row.headline]
    models = list(dict.fromkeys(run.model for run in runs))
    labels = column_labels(models)
    pubs = published_columns(rows, models, figures)
    series = [(labels[m], m, None) for m in models] + [(f"published {p}", None, p) for p in pubs]
    panels = [(kind, [r for r in rows if r.percent == kind]) for kind in (True, False)]
    panels = [(kind, rs) for kind, rs in panels if rs]
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) * max(1, len(series)) ** 0.5 + 3), 4.2 * len(panels)))
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(series))]
    width = 0.8 / len(series)
    for index, (percent, panel_rows) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, index + 1)
        scale = 100.0 if percent else 1.0
        ticks = []
        for x, row in enumerate(panel_rows):
            subset = False
            for s, (label, model, name) in enumerate(series):
                at = x - 0.4 + width * (s + 0.5)
                if model is not None:
                    metric = row.cells.get(model)
                    if metric is None:
                        continue
                    mean = metric["mean"] * scale
                    err = None
                    if metric.get("low") is not None and metric.get("high") is not None:
                        err = [[mean - metric["low"] * scale], [metric["high"] * scale - mean]]
                    ax.bar(at, mean, width, yerr=err, capsize=3, color=colors[s], label=label if x == 0 else None)
                else:
                    text, figure = published_cell(row, name, pubs[name], figures)
                    if figure is None:
                        continue
                    subset = subset or text.endswith("(subset)")
                    ax.bar(at, figure.value, width, color="white", edgecolor=colors[s], hatch="//",
                           label=label)
            ticks.append(row.benchmark + ("*" if subset else ""))
        ax.set_xticks(range(len(panel_rows)), ticks)
        ax.set_ylabel("score (%)" if percent else "rating (1-10)")
        ax.set_ylim(0, 100 if percent else 10)
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        if len(panel_rows) > 6:
            ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("headline metric by benchmark; error bars: 95 % interval; hatched: published; "
                 "*: our runs scored a subset of the published items", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:  # a temporary file beside `path`, renamed into place
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")  # "tight": the legend sits outside


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, png: str | os.PathLike | None,
                 figures=pub.FIGURES) -> str:
    """Read the summaries, write the Markdown report to `out` and (unless `png` is None) the chart;
    return the Markdown."""
    runs = read_runs(paths)
    text = markdown(runs, figures)
    for target in (out, png):
        if target is not None:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    write_text_atomic(out, text)
    if png is not None:
        plot(runs, png, figures)
    return text
