"""`qwen2 eval report`: the Markdown table read back equals the summaries' numbers, published figures
appear only where they apply, the chart is a real PNG, bad files are one-line errors. No model: the
summaries are made from synthetic per-item records by the runners' own summarising code."""
import json
import os
import random
import re

import pytest

from qwen2 import cli
from qwen2.errors import Qwen2Error
from qwen2.eval import humaneval, published as pub, report
from qwen2.eval.results import ResultsFile, mean_interval, summarize_scores

GSM8K = ("exact_match,strict-match", "exact_match,flexible-extract")
IFEVAL = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def run_summary(tmp_path, name, benchmark, model, metrics, n, p, *, seed, data=None, group=None, **extra):
    """A results JSONL and its summary, written as `qwen2.eval.runner.run` writes them, from `n`
    synthetic items each scoring 1 with probability `p`. Returns (results path, summary)."""
    rng = random.Random(seed)
    records = [{"id": str(i), **({group: f"task{i % 4}"} if group else {}),
                "scores": {m: float(rng.random() < p) for m in metrics}} for i in range(n)]
    settings = {"benchmark": benchmark, "model": model, "data": data, "shots": 3, "chat": True, "max_new_tokens": 256}
    results = ResultsFile(tmp_path / f"{name}.jsonl", settings)
    results.append(records)
    summary = {"benchmark": benchmark, "model": model, **summarize_scores(records, metrics, group), **extra}
    results.write_summary(summary)
    return str(tmp_path / f"{name}.jsonl"), {**summary, "settings": settings}


def summary_file(results_path: str) -> str:
    return results_path[:-len(".jsonl")] + ".summary.json"


def parse_table(text: str) -> tuple[list[str], dict[tuple[str, str], dict[str, str]]]:
    """The Markdown table back: its header, and (benchmark, metric) -> column -> cell text."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    header = split(lines[0])
    rows, benchmark = {}, None
    for line in lines[2:]:
        cells = split(line)
        benchmark = cells[0] or benchmark  # the benchmark is named on its first (headline) row only
        rows[(benchmark, cells[1])] = dict(zip(header[2:], cells[2:]))
    return header, rows


CELL = re.compile(r"^(-?[\d.]+)(?: \[(-?[\d.]+), (-?[\d.]+)\])? \((\d+)( groups)?\)$")


def assert_cell(cell: str, metric: dict, scale: float, digits: int):
    m = CELL.match(cell)
    assert m, cell
    tolerance = 0.5 * 10 ** -digits + 1e-9
    assert abs(float(m[1]) - scale * metric["mean"]) <= tolerance
    assert abs(float(m[2]) - scale * metric["low"]) <= tolerance
    assert abs(float(m[3]) - scale * metric["high"]) <= tolerance
    assert int(m[4]) == metric["n"]


@pytest.fixture
def three_benchmarks(tmp_path):
    """Two models and llama.cpp's run of one of them; GSM8K (two metrics), BBH (by task), IFEval
    (whose summary names a headline that is not its first metric)."""
    ours, llama, other = "Qwen/Qwen2-0.5B-Instruct", "llama.cpp:qwen2-0_5b-instruct-q8_0.gguf", "/models/tiny-lm"
    made = [
        run_summary(tmp_path, "gsm8k-ours", "gsm8k", ours, GSM8K, 40, 0.4, seed=1),
        run_summary(tmp_path, "gsm8k-llama", "gsm8k", llama, GSM8K, 40, 0.35, seed=2),
        run_summary(tmp_path, "gsm8k-other", "gsm8k", other, GSM8K, 30, 0.1, seed=3),
        run_summary(tmp_path, "bbh-ours", "bbh", ours, ("exact_match",), 60, 0.3, seed=4, group="task"),
        run_summary(tmp_path, "bbh-llama", "bbh", llama, ("exact_match",), 60, 0.25, seed=5, group="task"),
        run_summary(tmp_path, "ifeval-ours", "ifeval", ours, IFEVAL[::-1], 50, 0.5, seed=6, headline=IFEVAL[0]),
        run_summary(tmp_path, "ifeval-other", "ifeval", other, IFEVAL[::-1], 50, 0.2, seed=7, headline=IFEVAL[0]),
    ]
    return [summary_file(path) for path, _ in made], [s for _, s in made]


def test_table_cells_are_the_summaries_numbers(three_benchmarks):
    files, summaries = three_benchmarks
    header, rows = parse_table(report.markdown(report.read_runs(files)))
    labels = {"Qwen/Qwen2-0.5B-Instruct": "Qwen2-0.5B-Instruct",
              "llama.cpp:qwen2-0_5b-instruct-q8_0.gguf": "llama.cpp:qwen2-0_5b-instruct-q8_0.gguf",
              "/models/tiny-lm": "tiny-lm"}
    assert header[2:5] == list(labels.values())  # llama.cpp's run has its own column
    checked = 0
    for s in summaries:
        for metric, value in s.items():
            if isinstance(value, dict) and "mean" in value:
                assert_cell(rows[(s["benchmark"], metric)][labels[s["model"]]], value, 100, 1)
                checked += 1
        if "exact_match_macro" in s:  # BBH's macro average over its four tasks, no interval
            cell = rows[("bbh", "exact_match_macro")][labels[s["model"]]]
            assert cell == f"{100 * s['exact_match_macro']:.1f} (4 groups)"
    assert checked == 3 * 2 + 2 * 1 + 2 * 4
    # A benchmark a model did not run is an empty cell, not a zero.
    assert rows[("bbh", "exact_match")]["tiny-lm"] == report.MISSING
    # Rows: each benchmark's headline metric first (IFEval's summary names its headline).
    order = list(rows)
    assert order[0] == ("gsm8k", GSM8K[0])
    assert order.index(("ifeval", IFEVAL[0])) == order.index(("bbh", "exact_match_macro")) + 1


def test_published_figures_only_where_they_apply(tmp_path):
    ours, llama, base = "Qwen/Qwen2-0.5B-Instruct", "llama.cpp:qwen2-0_5b-instruct-q8_0.gguf", "qwen2-0_5b.gguf"
    figure = {(f.model, f.benchmark): f for f in pub.FIGURES}
    # Our run on the full GSM8K test set given with --data, llama.cpp's on the offline pack.
    full, _ = run_summary(tmp_path, "gsm8k-full", "gsm8k", ours, GSM8K, 1319, 0.4, seed=1, data="/data/gsm8k.parquet")
    pack, _ = run_summary(tmp_path, "gsm8k-pack", "gsm8k", llama, GSM8K, 8, 0.4, seed=2)
    ifeval, _ = run_summary(tmp_path, "ifeval", "ifeval", ours, IFEVAL, 541, 0.3, seed=3, data="/data/ifeval.jsonl")
    bbh, _ = run_summary(tmp_path, "bbh", "bbh", base, ("exact_match",), 27, 0.3, seed=4)
    tiny, _ = run_summary(tmp_path, "bbh-tiny", "bbh", "tiny", ("exact_match",), 27, 0.3, seed=5)

    def table(*paths):
        text = report.markdown(report.read_runs([summary_file(p) for p in paths]))
        return text, *parse_table(text)

    text, header, rows = table(full, ifeval)
    strict = figure[("Qwen2-0.5B-Instruct", "ifeval")]
    assert header[-1] == "published Qwen2-0.5B-Instruct"
    assert rows[("gsm8k", GSM8K[0])][header[-1]] == f"{figure[('Qwen2-0.5B-Instruct', 'gsm8k')].value:.1f}"
    assert rows[("gsm8k", GSM8K[1])][header[-1]] == report.MISSING       # the figure is the headline metric's
    assert rows[("ifeval", strict.metric)][header[-1]] == f"{strict.value:.1f}"  # IFEval: strict prompt-level only
    assert all(rows[("ifeval", m)][header[-1]] == report.MISSING for m in IFEVAL[1:])
    assert strict.source in text

    # llama.cpp's run of the same model shares the published column; one of the two on the pack
    # makes the figure "(subset)".
    _, header, rows = table(full, pack)
    assert [h for h in header if h.startswith("published")] == ["published Qwen2-0.5B-Instruct"]
    assert rows[("gsm8k", GSM8K[0])][header[-1]].endswith("(subset)")

    # The base model's figures are not the instruct model's: BBH has a base figure (Table 5) and no
    # instruct one (Table 9); a model with no published figures gets no published column.
    _, header, rows = table(full, bbh, tiny)
    assert header[-2:] == ["published Qwen2-0.5B-Instruct", "published Qwen2-0.5B"]
    assert rows[("bbh", "exact_match")]["published Qwen2-0.5B"] == f"{figure[('Qwen2-0.5B', 'bbh')].value:.1f} (subset)"
    assert rows[("bbh", "exact_match")]["published Qwen2-0.5B-Instruct"] == report.MISSING
    assert rows[("gsm8k", GSM8K[0])]["published Qwen2-0.5B"] == report.MISSING  # the base model did not run GSM8K


def test_multiple_choice_summary(tmp_path):
    """`qwen2 eval mc`'s summary: accuracy and its variants with intervals, macro averages over the
    subjects, per-subject breakdowns left out of the table; "mc-mmlu" meets MMLU's published figure."""
    from qwen2.eval import multiple_choice

    rng = random.Random(2)
    records = [{"id": str(i), "subject": f"subject{i % 5}",
                "scores": {m: float(rng.random() < 0.45) for m in multiple_choice.METRICS}} for i in range(60)]
    summary = {"benchmark": "mc-mmlu", "model": "Qwen/Qwen2-1.5B", **multiple_choice.summarize(records)}
    (tmp_path / "mmlu.summary.json").write_text(json.dumps({**summary, "settings": {"data": None, "shots": 5}}))
    _, rows = parse_table(report.markdown(report.read_runs([tmp_path / "mmlu.summary.json"])))
    metrics = [metric for _, metric in rows]
    assert metrics[0] == "acc"
    assert sorted(metrics) == sorted([*multiple_choice.METRICS, *(f"{m}_macro" for m in multiple_choice.METRICS)])
    for metric in multiple_choice.METRICS:
        assert_cell(rows[("mc-mmlu", metric)]["Qwen2-1.5B"], summary[metric], 100, 1)
    mmlu = next(f for f in pub.FIGURES if f.model == "Qwen2-1.5B" and f.benchmark == "mmlu")
    assert rows[("mc-mmlu", "acc")]["published Qwen2-1.5B"] == f"{mmlu.value:.1f} (subset)"


def test_model_names_meet_their_published_figures():
    key = pub.model_key
    for name in ("Qwen/Qwen2-0.5B-Instruct", "/models/Qwen2-0.5B-Instruct-GGUF/", "qwen2-0_5b-instruct-q8_0.gguf",
                 "llama.cpp:/m/qwen2-0_5b-instruct-q4_k_m.gguf", "Qwen2-0.5B-Instruct-AWQ"):
        assert key(name) == key("Qwen2-0.5B-Instruct"), name
    assert key("qwen2.5-coder-0.5b-instruct") == key("Qwen2.5-Coder-0.5B-Instruct")  # the registry's name
    assert len({key(n) for n in ("Qwen2-0.5B", "Qwen2-0.5B-Instruct", "Qwen2-1.5B", "Qwen2.5-Coder-0.5B-Instruct")}) == 4
    assert {pub.benchmark_key(n) for n in ("C-Eval", "ceval", "c_eval")} == {"ceval"}
    assert pub.benchmark_key("ARC-C") == pub.benchmark_key("arc_challenge")


def test_every_published_figure_names_its_source_and_item_set():
    seen = set()
    for f in pub.FIGURES:
        assert re.search(r"arXiv:\d{4}\.\d{5}.*Table \d+", f.source), f
        assert pub.benchmark_key(f.benchmark) in pub.ITEM_SETS, f  # so "(subset)" can be decided
        assert 0 < f.value <= 100, f
        ident = (pub.model_key(f.model), pub.benchmark_key(f.benchmark), f.metric)
        assert ident not in seen, f
        seen.add(ident)
    # An offline pack is never the published item set, a full --data file of the right size is,
    # and a shipped full set (HumanEval's 164 problems) is without --data.
    assert not pub.on_published_items("gsm8k", 1319, {"data": None})
    assert pub.on_published_items("gsm8k", 1319, {"data": "/x.parquet"})
    assert not pub.on_published_items("gsm8k", 100, {"data": "/x.parquet"})  # --limit
    assert pub.on_published_items("humaneval", 164, {})


def test_humaneval_summaries(tmp_path):
    """HumanEval's own summary shape: greedy runs get pass@1's interval from the pass count, sampled
    runs from the per-problem estimates in the results file beside."""
    greedy = [{"task_id": f"HumanEval/{i}", "passed": i % 3 == 0} for i in range(12)]
    (tmp_path / "he.summary.json").write_text(json.dumps(
        {**humaneval.summarize(greedy, [1]), "settings": {"model": "qwen2.5-coder-0.5b-instruct", "samples": 1}}))
    sampled = [{"task_id": f"HumanEval/{i}", "sample": j, "passed": (i + j) % 4 == 0} for i in range(10) for j in range(5)]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sampled))
    (tmp_path / "hs.summary.json").write_text(json.dumps(
        {**humaneval.summarize(sampled, [1, 5]), "settings": {"model": "sampled-model", "samples": 5}}))

    runs = report.read_runs([tmp_path / "he.summary.json", tmp_path / "hs.jsonl"])
    _, rows = parse_table(report.markdown(runs))
    expected = mean_interval([float(r["passed"]) for r in greedy])
    assert abs(expected["mean"] - humaneval.summarize(greedy, [1])["pass@1"]) < 1e-12
    assert_cell(rows[("humaneval", "pass@1")]["qwen2.5-coder-0.5b-instruct"], expected, 100, 1)
    per_problem = {}
    for r in sampled:
        per_problem.setdefault(r["task_id"], []).append(r["passed"])
    for k in (1, 5):
        want = mean_interval([humaneval.pass_at_k(len(v), sum(v), k) for v in per_problem.values()])
        assert_cell(rows[("humaneval", f"pass@{k}")]["sampled-model"], want, 100, 1)
    # 12 problems are not HumanEval's 164: the Coder's published figure is there, as a subset's.
    coder = next(f for f in pub.FIGURES if f.model == "Qwen2.5-Coder-0.5B-Instruct" and f.benchmark == "humaneval")
    assert rows[("humaneval", "pass@1")]["published Qwen2.5-Coder-0.5B-Instruct"] == f"{coder.value:.1f} (subset)"


def test_mt_bench_summary(tmp_path):
    """MT-Bench's own summary (turn 1, turn 2 and overall ratings, per-category means, counts of
    unparseable judgements): its rows are on the 1-10 scale, "overall" first, the judge in the inputs."""
    from qwen2.eval import mt_bench

    rng = random.Random(1)
    records = [{"id": i, "category": mt_bench.CATEGORIES[i % 8],
                "judgements": [{"turn": t, "rating": rng.choice([mt_bench.UNPARSEABLE, *range(1, 11)])} for t in (1, 2)]}
               for i in range(24)]
    summary = {"benchmark": "mt-bench", "model": "answerer", "judge": "judge-model", **mt_bench.summarize(records)}
    (tmp_path / "mt.summary.json").write_text(json.dumps({**summary, "settings": {"data": None, "judge": "judge-model"}}))
    text = report.markdown(report.read_runs([tmp_path / "mt.summary.json"]))
    _, rows = parse_table(text)
    assert list(rows) == [("mt-bench", "overall"), ("mt-bench", "turn1"), ("mt-bench", "turn2")]
    for turn in ("overall", "turn1", "turn2"):
        assert_cell(rows[("mt-bench", turn)]["answerer"], summary[turn], 1, 2)
    assert "24 items" in text and "judged by judge-model" in text


def test_ratings_stay_on_their_scale(tmp_path):
    """An MT-Bench-shaped summary: an overall rating and per-category ratings (a metric of metrics),
    shown on the 1-10 scale even when every rating is 1."""
    rng = random.Random(0)
    ratings = {c: [float(rng.randint(1, 10)) for _ in range(10)] for c in ("writing", "math")}
    ones = [1.0] * 20
    summary = {"benchmark": "mt_bench", "model": "judged-model", "items": 20,
               "score": mean_interval(ratings["writing"] + ratings["math"]),
               "categories": {c: mean_interval(v) for c, v in ratings.items()},
               "unparseable": 0, "settings": {"data": None}}
    (tmp_path / "mt.summary.json").write_text(json.dumps(summary))
    (tmp_path / "ones.summary.json").write_text(json.dumps({**summary, "model": "all-ones", "score": mean_interval(ones)}))
    runs = report.read_runs([tmp_path / "mt.summary.json", tmp_path / "ones.summary.json"])
    _, rows = parse_table(report.markdown(runs))
    assert_cell(rows[("mt_bench", "score")]["judged-model"], summary["score"], 1, 2)
    for c in ratings:
        assert_cell(rows[("mt_bench", f"categories/{c}")]["judged-model"], summary["categories"][c], 1, 2)
    assert rows[("mt_bench", "score")]["all-ones"] == "1.00 [1.00, 1.00] (20)"


def test_png_is_a_chart_written_atomically(three_benchmarks, tmp_path):
    import matplotlib.image

    files, _ = three_benchmarks
    out, png = tmp_path / "out" / "report.md", tmp_path / "out" / "chart.png"
    text = report.write_report(files, out, png)
    assert out.read_text(encoding="utf-8") == text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert sorted(os.listdir(out.parent)) == ["chart.png", "report.md"]  # no temporary files left


@pytest.mark.parametrize("content, says", [
    ("not json {", "not JSON"),
    ("[1, 2]", "a JSON list"),
    ('{"model": "m", "acc": {"mean": 0.5, "n": 3}}', 'no "benchmark"'),
    ('{"benchmark": "gsm8k", "model": "m", "items": 3}', "no scored metric"),
    ('{"problems": 3, "pass@1": 0.5}', "problems/samples/passed"),
])
def test_a_file_that_is_not_a_summary_is_a_one_line_error(tmp_path, capsys, content, says):
    bad = tmp_path / "bad.summary.json"
    bad.write_text(content)
    with pytest.raises(Qwen2Error, match=re.escape(says)) as e:
        report.read_run(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert cli.main(["eval", "report", str(bad), "--out", str(tmp_path / "r.md"), "--no-png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "r.md").exists()


def test_unreadable_unfinished_and_duplicate_inputs(three_benchmarks, tmp_path):
    files, _ = three_benchmarks
    with pytest.raises(Qwen2Error, match="cannot read .*missing.summary.json"):
        report.read_run(tmp_path / "missing.summary.json")
    (tmp_path / "unfinished.jsonl").write_text('{"id": "0"}\n')
    with pytest.raises(Qwen2Error, match="unfinished.jsonl has no summary beside it"):
        report.read_run(tmp_path / "unfinished.jsonl")
    with pytest.raises(Qwen2Error, match="both gsm8k of Qwen/Qwen2-0.5B-Instruct"):
        report.read_runs([files[0], files[0]])
    with pytest.raises(Qwen2Error, match="no summaries given"):
        report.read_runs([])


def test_cli_report_offline(three_benchmarks, tmp_path, offline, capsys):
    """`qwen2 eval report` from results JSONL paths (the summary beside each is read), with extra
    published figures from --published; nothing is fetched (sockets refused)."""
    files, summaries = three_benchmarks
    results = [f[:-len(".summary.json")] + ".jsonl" for f in files]
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps([{"model": "tiny-lm", "benchmark": "GSM8K", "value": 12.5, "source": "our notes, p. 3"}]))
    out = tmp_path / "report.md"
    assert cli.main(["eval", "report", *results, "--out", str(out), "--published", str(extra)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text(encoding="utf-8") in printed and f"chart: {tmp_path / 'report.png'}" in printed
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    header, rows = parse_table(out.read_text(encoding="utf-8"))
    assert rows[("gsm8k", GSM8K[0])]["published tiny-lm"] == "12.5 (subset)"
    assert "our notes, p. 3" in printed
    assert_cell(rows[("gsm8k", GSM8K[0])]["Qwen2-0.5B-Instruct"], summaries[0][GSM8K[0]], 100, 1)

    extra.write_text(json.dumps([{"model": "tiny-lm", "benchmark": "gsm8k", "value": 12.5}]))
    assert cli.main(["eval", "report", *results, "--out", str(out), "--no-png", "--published", str(extra)]) == 1
    assert "entry 0 has no source" in capsys.readouterr().err
