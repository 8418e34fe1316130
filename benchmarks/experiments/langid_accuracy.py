"""Language ID accuracy of `qwen2 data langid` (lingua, offline) on labelled sentences from a source
the detector never saw: Debian's translation catalogues.

    pip install -e '.[data,bench]'                          # lingua, the plot
    python -m benchmarks.experiments.langid_accuracy         # ~1 minute: 100 sentences per language
    python -m benchmarks.experiments.langid_accuracy --smoke # ~15 s: 50 per language, results in runs/

Items (`qwen2.data.langid.labelled_sentences`): the messages of the compiled catalogues under
/usr/share/locale/<locale>/LC_MESSAGES/*.mo, read with Python's gettext by `qwen2.data.corpora`,
labelled with the locale's language; only catalogues of the packages corpora holds out from every
other use, except for a language with too few there, which draws from all catalogues (the table
says which). Only prose counts (`is_prose`): at least 30 characters and 5 words (or 10 characters of
a script written without spaces), no command-line option, markup, path or code character; short
interface strings ("Open", "Print…") are ambiguous in any language. A seeded sample of --per-language
sentences; a language with fewer than 50 is listed but not scored (the acceptance asks for >= 50).

Measured, with the command's own detector (`Detector`, the default language set and the report's):
accuracy per language, over all sentences (micro) and the mean of languages (macro), the confusion
table, sentences per second; and, for comparison, the accuracy on every line corpora calls a
sentence (>= 20 characters and 3 words, mostly letters), usage strings and all.

Output: benchmarks/results/langid.{md,json,png} (with --smoke: runs/langid-smoke/results/).
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import RESULTS_DIR, apply_preset, machine_facts, save_png, write_report
from qwen2.errors import Qwen2Error

RESULTS = f"{RESULTS_DIR}/langid"
FULL = dict(per_language=100)
SMOKE = dict(per_language=50)
MIN_SENTENCES = 50  # a language with fewer held-out sentences is listed, not scored


def language_names() -> dict[str, str]:
    from lingua import Language

    names = {language.iso_code_639_1.name.lower(): language.name.title() for language in Language.all()}
    return {**names, "nb": "Norwegian Bokmål", "lo": "Lao", "my": "Burmese", "km": "Khmer", "und": "(none)"}


def run(args) -> dict:
    from qwen2.data.langid import DEFAULT_LANGUAGES, REPORT_LANGUAGES, Detector, evaluate, labelled_sentences

    start = time.perf_counter()
    sample = labelled_sentences(args.per_language, DEFAULT_LANGUAGES, seed=args.seed)
    scored = {code: v["sentences"] for code, v in sample.items() if len(v["sentences"]) >= MIN_SENTENCES}
    read_s = time.perf_counter() - start

    detector = Detector(DEFAULT_LANGUAGES)
    for sentences in scored.values():  # lingua loads each language's models on first use: not timed
        detector.detect(sentences[0])
    start = time.perf_counter()
    result = evaluate(scored, DEFAULT_LANGUAGES)
    detect_s = time.perf_counter() - start
    report = evaluate({code: s for code, s in scored.items() if code in REPORT_LANGUAGES}, REPORT_LANGUAGES)

    loose_sample = labelled_sentences(args.per_language, DEFAULT_LANGUAGES, seed=args.seed, prose=False)
    loose = evaluate({code: v["sentences"] for code, v in loose_sample.items()
                      if len(v["sentences"]) >= MIN_SENTENCES}, DEFAULT_LANGUAGES)
    sentences = sum(len(s) for s in scored.values())
    return {"languages": list(DEFAULT_LANGUAGES), "report_languages": list(REPORT_LANGUAGES),
            "per_language_asked": args.per_language, "seed": args.seed,
            "catalogues": {code: v["catalogues"] for code, v in sample.items()},
            "too_few": {code: len(v["sentences"]) for code, v in sample.items() if code not in scored},
            "missing": [code for code in DEFAULT_LANGUAGES if code not in sample],
            "default_set": result, "report_set": {k: report[k] for k in ("accuracy", "macro_accuracy")},
            "report_set_per_language": report["per_language"],
            "loose_filter": {k: loose[k] for k in ("accuracy", "macro_accuracy")} | {
                "languages": len(loose["per_language"])},
            "sentences": sentences, "sentences_per_s": round(sentences / detect_s, 1),
            "read_seconds": round(read_s, 1), "machine": machine_facts(threads=1)}


def confused_with(row: dict[str, int], true: str) -> str:
    wrong = sorted(((n, p) for p, n in row.items() if p != true), reverse=True)
    return ", ".join(f"{p} {n}" for n, p in wrong) or "–"


def markdown(summary: dict, smoke: bool) -> str:
    names = language_names()
    result, report = summary["default_set"], summary["report_set"]
    per = result["per_language"]
    order = [code for code in summary["languages"] if code in per]
    lines = ["# Language ID: `qwen2 data langid` on held-out labelled sentences" + (" — SMOKE RUN" if smoke else ""),
             "",
             "Written by `python -m benchmarks.experiments.langid_accuracy` (its docstring has the method). "
             f"Detector: lingua (offline models) over the default set of {len(summary['languages'])} languages "
             "(the Qwen2 report's and 11 more European ones; Lao, Burmese and Khmer by script), as the "
             "command runs it. Items: messages of Debian's translation catalogues (`/usr/share/locale/*/"
             "LC_MESSAGES/*.mo`, read with gettext), labelled by locale, from the packages `qwen2.data.corpora` "
             "holds out (all packages for the languages marked *all*); **prose only**: >= 30 characters and "
             ">= 5 words (or >= 10 characters of a script without spaces), no command-line option, markup, path "
             f"or code character. Up to {summary['per_language_asked']} sentences per language (seed "
             f"{summary['seed']}); languages with fewer than {MIN_SENTENCES} are not scored.", "",
             f"**Accuracy: {result['accuracy']:.1%}** over {len(per)} languages and {summary['sentences']:,} "
             f"sentences (macro {result['macro_accuracy']:.1%}); restricted to the report's languages and "
             f"detecting among them only: {report['accuracy']:.1%} over {len(summary['report_set_per_language'])} "
             f"languages. Without the prose filter (every catalogue line of >= 20 characters and 3 words, usage "
             f"strings and all): {summary['loose_filter']['accuracy']:.1%} over "
             f"{summary['loose_filter']['languages']} languages. Speed: {summary['sentences_per_s']:,.0f} "
             f"sentences/s on one core ({summary['machine'].get('cpu', 'CPU')}).", "",
             "| language | | catalogues | sentences | accuracy | detected instead (count) |",
             "|---|---|---|---:|---:|---|"]
    for code in order:
        r = per[code]
        lines.append(f"| {code} | {names.get(code, code)} | {summary['catalogues'][code]} | {r['n']} | "
                     f"{r['accuracy']:.0%} | {confused_with(result['confusion'][code], code)} |")
    if summary["too_few"] or summary["missing"]:
        few = ", ".join(f"{c} ({n})" for c, n in summary["too_few"].items())
        lines += ["", f"Not scored, too few prose sentences on this machine: {few or 'none'}; none at all: "
                      f"{', '.join(summary['missing']) or 'none'}. Lao, Burmese and Khmer are told by their script "
                      "(tests/test_data_langid.py checks each catalogue sentence written in it)."]
    worst = ", ".join(f"{c} {per[c]['accuracy']:.0%}" for c in sorted(order, key=lambda c: per[c]["accuracy"])[:4])
    lines += ["", "The errors are mostly between languages that are nearly one: Indonesian and Malay (two national "
              "standards of one language), Danish and Bokmål (a shared written tradition), and messages that are "
              f"half English or all names. Lowest: {worst}. "
              "Confusion matrix: `langid.png` (row-normalised); every count is in `langid.json`."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    result = summary["default_set"]
    rows = [code for code in summary["languages"] if code in result["per_language"]]
    extra = sorted({p for row in result["confusion"].values() for p in row} - set(rows))
    cols = rows + extra
    matrix = np.zeros((len(rows), len(cols)))
    for i, true in enumerate(rows):
        for predicted, n in result["confusion"][true].items():
            matrix[i, cols.index(predicted)] = n / result["per_language"][true]["n"]
    fig = Figure(figsize=(0.3 * len(cols) + 2.5, 0.3 * len(rows) + 2))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if matrix[i, j] > 0 and i != j:
                ax.text(j, i, f"{round(matrix[i, j] * 100)}", ha="center", va="center", fontsize=5, color="darkred")
    ax.set(xlabel="detected", ylabel="catalogue language",
           title=f"qwen2 data langid: {result['accuracy']:.1%} on held-out catalogue sentences "
                 "(off-diagonal: % of the row)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    save_png(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-language", type=int, help=f"sentences per language (default {FULL['per_language']})")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    ap.add_argument("--smoke", action="store_true", help="50 sentences per language; results in runs/langid-smoke")
    ap.add_argument("--out", default=None, help="run directory (default runs/langid[-smoke])")
    ap.add_argument("--results", default=None,
                    help="path stem of the .md/.json/.png (default benchmarks/results/langid)")
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "langid", RESULTS)
    write_report(run(args), args.results, args.smoke, markdown, plot)


if __name__ == "__main__":
    try:
        main()
    except Qwen2Error as e:  # no message catalogues on this machine
        sys.exit(f"error: {e}")
