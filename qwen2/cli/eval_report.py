"""`qwen2 eval report RESULTS...`: one Markdown table and one PNG from benchmark summaries."""
from __future__ import annotations

import os


def cmd_report(args) -> None:
    from ..eval import published, report

    figures = published.merged(published.read_figures(args.published)) if args.published else published.FIGURES
    png = None if args.no_png else (args.png or os.path.splitext(args.out)[0] + ".png")
    text = report.write_report(args.results, args.out, png, figures)
    print(text, end="")
    print(f"report: {args.out}" + (f", chart: {png}" if png else ""))


def add_report_parser(what) -> None:
    """Registers the subcommand on `what` (the `qwen2 eval` subparsers)."""
    p = what.add_parser("report", help="one Markdown table and one PNG chart from benchmark summaries "
                        "(each benchmark by model, with 95 %% intervals and the published figures)")
    p.add_argument("results", nargs="+", metavar="SUMMARY_OR_RESULTS",
                   help="NAME.summary.json files a `qwen2 eval` run wrote (or their results JSONL); "
                        "llama.cpp's runs are summaries too, their model named llama.cpp:...")
    p.add_argument("--out", default="report.md", help="the Markdown report (default report.md)")
    p.add_argument("--png", default=None, help="the chart (default: --out with .png)")
    p.add_argument("--no-png", action="store_true", help="write no chart")
    p.add_argument("--published", default=None, metavar="PATH",
                   help="more published figures, a JSON list of {model, benchmark, value, source[, metric]} "
                        "on the paper's scale (percent; 1-10 for ratings); they replace built-in ones "
                        "for the same model and benchmark")
    p.set_defaults(func=cmd_report)
