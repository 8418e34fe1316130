"""`qwen2 data ...`: the pre-training data verbs (added to the `qwen2` parser by qwen2/cli/__init__.py).
One function per verb adds its subparser; the work is in qwen2/data/, imported inside the commands
(datatrove and the corpora's packages load only when a verb runs)."""
from __future__ import annotations

import os

from ..data import PIPELINE_EXECUTORS

VERBS = []  # functions (subparsers) -> None, one per verb, in the order `qwen2 data --help` lists them


def verb(add):
    """Register a function that adds one `qwen2 data` subcommand."""
    VERBS.append(add)
    return add


def add_data_parser(sub) -> None:
    """The `data` command and its subcommands, on the top-level subparsers `sub`."""
    data = sub.add_parser("data", help="pre-training data: tokenizer training, deduplication, filters, "
                                       "language ID, decontamination, pipelines")
    what = data.add_subparsers(dest="verb", required=True)
    for add in VERBS:
        add(what)


@verb
def add_train_tokenizer(what) -> None:
    """`qwen2 data train-tokenizer INPUT... --vocab-size N --out DIR`: a byte-level BPE as Qwen2's."""
    p = what.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer the way Qwen2's is built")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="JSONL / Parquet shards of records with a \"text\" field (and optionally \"language\"), "
                        "directories of them, or text files (each one text)")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="BPE tokens: the 256 bytes and the merges; the control tokens get ids N, N+1, ...")
    p.add_argument("--out", required=True, metavar="DIR", help="the tokenizer directory to write")
    p.add_argument("--qwen25-extras", action="store_true",
                   help="also reserve Qwen2.5's tool-call, fill-in-the-middle and vision tokens")
    p.add_argument("--held-out", type=float, default=0.02, metavar="SHARE",
                   help="share of records kept from training to measure bytes per token on (default 0.02)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> None:
        from ..data.tokenizer_training import summary, train_tokenizer_dir

        stats = train_tokenizer_dir(args.inputs, args.vocab_size, args.out, qwen25_extras=args.qwen25_extras,
                                    held_out=args.held_out, force=args.force, progress=not args.no_progress)
        print(summary(stats))
        print(f"tokenizer: {args.out} (stats.json beside it)")

    p.set_defaults(func=run)


@verb
def _add_make_corpus(what) -> None:
    """`qwen2 data make-corpus OUT --size-mb N --seed S [--shards K]`: a test corpus with planted problems."""
    p = what.add_parser("make-corpus", help="assemble a test corpus from this machine's own text, with planted "
                                            "duplicates, near-duplicates, junk and HumanEval prompts, labelled")
    p.add_argument("out", metavar="OUT", help="the directory to write: shard-*.jsonl and manifest.json")
    p.add_argument("--size-mb", type=float, required=True, metavar="N", help="about how many MB (10^6 bytes)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed gives the same corpus (default 0)")
    p.add_argument("--shards", type=int, default=1, metavar="K", help="how many JSONL shards (default 1)")

    def run(args) -> None:
        from ..data.planted import build

        m = build(args.out, args.size_mb, seed=args.seed, shards=args.shards)
        kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in m["counts"].items())
        print(f"{m['records']} records, {m['bytes'] / 1e6:.1f} MB in {len(m['shards'])} shard(s): {kinds}")
        print(f"corpus: {args.out} (manifest.json beside the shards)")

    p.set_defaults(func=run)


def add_run_args(p, inputs: bool = True) -> None:
    """What every verb that streams shards takes: inputs, output, and how the pipeline runs."""
    if inputs:
        p.add_argument("inputs", nargs="+", metavar="IN", help="input shards (JSONL, .jsonl.gz, Parquet) or directories")
        p.add_argument("out", metavar="OUT", help="output directory: one shard per input shard, and stats.json")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--executor", choices=PIPELINE_EXECUTORS, default="local",
                   help="local processes (default) or a Ray cluster (pip install -e '.[data-ray]')")
    p.add_argument("--address", default=None, help="the Ray cluster's address (default: start or find a local one)")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip malformed records and empty shards instead of stopping at the first")
    p.add_argument("--removed", default=None, metavar="FILE", help="write every removed record, with its reason, here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_options(args):
    """The RunOptions of a verb's parsed arguments (`add_run_args`)."""
    from ..data.shards import RunOptions, connect_ray

    options = RunOptions(workers=args.workers, executor=args.executor, ray_address=args.address,
                         skip_bad=args.skip_bad, removed=args.removed, progress=not args.no_progress)
    if options.executor == "ray":  # now, before the verb writes anything: a dead address is one line, in seconds
        connect_ray(options.ray_address)
    return options


@verb
def _add_dedup(what) -> None:
    """`qwen2 data dedup IN... OUT [--near JACCARD]`: exact and near-duplicate removal, first of each cluster kept."""
    p = what.add_parser("dedup", help="remove exact duplicates (normalised text) and near duplicates (MinHash LSH), "
                                      "keeping the first document of each cluster")
    add_run_args(p)
    p.add_argument("--near", type=float, default=0.8, metavar="JACCARD",
                   help="Jaccard similarity of word 5-gram shingles from which documents are near duplicates "
                        "(default 0.8); 0: exact duplicates only")

    def run(args) -> None:
        from ..data.dedup import dedup, summary

        stats = dedup(args.inputs, args.out, near=args.near, options=run_options(args))
        print(summary(stats), f"output: {args.out} (stats.json beside the shards)", sep="\n")

    p.set_defaults(func=run)


@verb
def add_langid(what) -> None:
    """`qwen2 data langid IN... OUT [--keep LANGS] [--balance SHARES]`: language ID with lingua, offline."""
    def run(args) -> None:
        from ..data.langid import langid

        stats = langid(args.inputs, args.out, languages=args.languages, keep=args.keep, balance=args.balance,
                       by=args.balance_by, seed=args.seed, options=run_options(args))
        print(f"{stats['documents_in']} records in, {stats['documents_out']} out; "
              f"removed: {stats['removed'] or 'none'}")
        print("languages in (out): " + ", ".join(f"{code} {c['documents_in']} ({c['documents_out']})"
                                                for code, c in list(stats["languages"].items())[:15]))
        if "balance" in stats:
            shares = stats["balance"]["shares_out"]
            print("shares out: " + ", ".join(f"{code} {share:.3f}" for code, share in shares.items()))
        print(f"output: {args.out} (stats.json beside the shards)")

    p = what.add_parser("langid", help="label each record's language (ISO 639-1) offline; keep some languages "
                                       "and down-sample to target shares")
    p.add_argument("--languages", default="default", metavar="LANGS",
                   help="the languages to tell apart: comma-separated ISO 639-1 codes, 'default' (the Qwen2 "
                        "report's ~30 and 11 more European ones), 'report', or 'all' (lingua's 75 and lo, my, km)")
    p.add_argument("--keep", default=None, metavar="LANGS", help="keep only these languages (comma-separated codes)")
    p.add_argument("--balance", default=None, metavar="SHARES",
                   help="down-sample to these shares, e.g. en=0.5,zh=0.3,other=0.2 (other: every language not "
                        "named; weights are normalised); languages not named and no other are dropped")
    p.add_argument("--balance-by", choices=["bytes", "documents"], default="bytes",
                   help="what the shares are shares of (default bytes)")
    p.add_argument("--seed", type=int, default=0, help="the balance draw's seed (default 0)")
    add_run_args(p)
    p.set_defaults(func=run)


@verb
def add_decontaminate(what) -> None:
    """`qwen2 data decontaminate IN... OUT --against humaneval [FILE...]`: n-gram overlap with evaluation sets."""
    def run(args) -> None:
        from ..data.decontaminate import decontaminate

        stats = decontaminate(args.inputs, args.out, against=args.against, n=args.ngram, min_matches=args.min_matches,
                              mark_only=args.mark_only, options=run_options(args))
        c = stats["contamination"]
        print(f"{c['ngrams_indexed']} {c['ngram']}-grams from {sum(c['eval_texts'].values())} evaluation texts "
              f"({c['eval_texts_too_short']} too short to index)")
        by_set = ", ".join(f"{name} {n}" for name, n in c["by_set"].items())
        print(f"{stats['documents_in']} records in, {c['documents_flagged']} contaminated "
              f"({'marked' if c['mark_only'] else 'dropped'}): {by_set}")
        print(f"output: {args.out} (stats.json beside the shards)")

    p = what.add_parser("decontaminate", help="drop (or mark) records sharing 13-word sequences with evaluation "
                                              "sets: HumanEval and any JSONL given")
    add_run_args(p)
    p.add_argument("--against", nargs="+", default=["humaneval"], metavar="SET_OR_FILE",
                   help="'humaneval' (the prompts `qwen2 eval humaneval` runs) and/or JSONL files, every string "
                        "of every record an evaluation text (default: humaneval)")
    p.add_argument("--ngram", type=int, default=13, metavar="N", help="words per n-gram (default 13, lm-eval's)")
    p.add_argument("--min-matches", type=int, default=1, metavar="K",
                   help="n-grams a record must share to be contaminated (default 1)")
    p.add_argument("--mark-only", action="store_true",
                   help="keep contaminated records, with a \"contamination\" field, instead of dropping them")
    p.set_defaults(func=run)


@verb
def add_filter(what) -> None:
    """`qwen2 data filter IN... OUT [--heuristics ...] [--model M --max-perplexity X] [--classifier DIR --min-score S]`:
    heuristic rules and model scores (qwen2/data/quality.py)."""
    def run(args) -> None:
        from ..data.pipeline import filter_settings
        from ..data.quality import filter_shards

        settings = filter_settings(args.heuristics, args.model, args.quantize, args.dtype, args.max_tokens,
                                   args.batch_size, args.max_perplexity, args.classifier, args.min_score)
        stats = filter_shards(args.inputs, args.out, settings, run_options(args))
        print(f"{stats['documents_in']} records in, {stats['documents_out']} out; removed: "
              + (", ".join(f"{k} {v}" for k, v in stats["removed"].items()) or "none"))
        print(f"output: {args.out} (stats.json beside the shards)")

    p = what.add_parser("filter", help="heuristic and model-based quality filtering; every record gets \"quality\" "
                                       "with every score, kept or not")
    add_run_args(p)
    p.add_argument("--heuristics", default="default", metavar="RULES",
                   help="comma-separated rules and presets: 'default' (any language, code too: repetition, mojibake, "
                        "gibberish, boilerplate), 'web' (datatrove's gopher, c4, fineweb at their published "
                        "thresholds: English web text), 'none', or those rule names")
    p.add_argument("--model", default=None, metavar="M",
                   help="score each record's perplexity under this model (registry name, HF directory or .gguf), "
                        "e.g. qwen2.5-coder-0.5b-instruct; default with --classifier: the classifier's model")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-pure"], default=None,
                   help="run the scoring model weight-quantised (CPU)")
    p.add_argument("--dtype", default="float32", help="the scoring model's dtype (default float32)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="score each record's first N tokens (default 512, or the classifier's)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="records per model batch (default 32)")
    p.add_argument("--max-perplexity", type=float, default=None, metavar="X",
                   help="drop records whose perplexity under --model is above X")
    p.add_argument("--classifier", default=None, metavar="DIR", help="score records with this quality classifier "
                                                                      "(`qwen2 data train-classifier`)")
    p.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="drop records the classifier scores below S (its P(good), 0 to 1)")
    p.set_defaults(func=run)


@verb
def add_pipeline(what) -> None:
    """`qwen2 data pipeline CONFIG.yaml`: dedup, filter, langid and decontaminate as one run, here or on Ray."""
    def run(args) -> None:
        from ..data.pipeline import load_config, run_pipeline, summary

        config = load_config(args.config)  # every step checked before the executor is reached
        stats = run_pipeline(config, run_options(args))
        print(summary(stats))
        print(f"output: {stats['output']} (every step's stats: {os.path.join(config.output, 'stats.json')})")

    p = what.add_parser("pipeline", help="run several steps (dedup, filter, langid, decontaminate) from a YAML config "
                                         "as one pipeline, on this machine or a Ray cluster")
    p.add_argument("config", metavar="CONFIG", help="a YAML file: input (shards or directories), output (a "
                                                    "directory), steps (each verb with its options; see README)")
    add_run_args(p, inputs=False)
    p.set_defaults(func=run)


@verb
def add_train_classifier(what) -> None:
    """`qwen2 data train-classifier POS NEG --model M --out DIR`: the quality classifier `filter --classifier` reads."""
    def run(args) -> None:
        from ..data.quality import train_classifier
        from ..data.quality_model import ScoringModel

        spec = ScoringModel(args.model, args.quantize, args.dtype, args.max_tokens)
        config = train_classifier([args.pos], [args.neg], spec, args.out, max_docs=args.max_docs, steps=args.steps,
                                  lr=args.lr, seed=args.seed, batch_size=args.batch_size, skip_bad=args.skip_bad,
                                  progress=not args.no_progress)
        print(f"{config['positives']} good and {config['negatives']} bad records; training accuracy "
              f"{config['train_accuracy']:.3f}, ROC AUC {config['train_auc']:.3f}")
        print(f"classifier: {args.out} (use it with `qwen2 data filter --classifier {args.out} --min-score S`)")

    p = what.add_parser("train-classifier", help="train a quality classifier: logistic regression on a small "
                                                 "Qwen2's mean hidden state of good and bad records")
    p.add_argument("pos", metavar="POS", help="good records: JSONL / Parquet shards or a directory of them")
    p.add_argument("neg", metavar="NEG", help="bad records: JSONL / Parquet shards or a directory of them")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", metavar="M",
                   help="the model whose hidden states are read (default qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--out", required=True, metavar="DIR", help="the classifier directory to write")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-pure"], default=None,
                   help="run the model weight-quantised (CPU)")
    p.add_argument("--dtype", default="float32", help="the model's dtype (default float32)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N", help="read each record's first N tokens "
                                                                           "(default 512)")
    p.add_argument("--max-docs", type=int, default=None, metavar="N", help="at most N records of each side")
    p.add_argument("--steps", type=int, default=300, help="full-batch optimisation steps (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights' seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="records per model batch (default 32)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
