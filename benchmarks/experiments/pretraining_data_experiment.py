"""The Qwen2 report's data claims, in miniature, on the CPU: (1) filtering the pre-training data
(dedup + quality filtering + decontamination) makes a better model for the same token budget;
(2) the data distribution is tuned on small models: three domain mixtures, same budget, held-out
loss per domain.

    pip install -e '.[data,bench]'                                        # datatrove, datasketch, the plot
    python -m benchmarks.experiments.pretraining_data_experiment          # both parts (~20 min, 1 thread)
    python -m benchmarks.experiments.pretraining_data_experiment --smoke  # ~40 s: tiny corpus and model
    python -m benchmarks.experiments.pretraining_data_experiment --part filter   # or --part mixture
    python -m benchmarks.experiments.pretraining_data_experiment --part filter --steps 600 --eval-every 100 \
        --out runs/pretraining-data-600 --results benchmarks/results/pretraining_data-600steps  # budget x2 (~35 min)

Held-out text (chosen first): clean documents of each of the planted corpus's five sources
(translations, man pages, package documentation, Python, Shakespeare; `qwen2.data.planted.
clean_documents` with seed 41, one source at a time), --heldout-kb per source, each document cut to
3,000 characters. Nothing of it is trained on: every record of the training corpus that shares a
source file (origin and language) with a held-out document, or half of its word 5-grams (or half
of one held-out document's) with the held-out text, is dropped before anything else is done.

Training corpus: `qwen2.data.planted.build` (seed 42, --train-mb) with more planted problems than
the defaults: of the records, 15 % exact duplicates, 5 % whitespace/case duplicates, 10 % near
duplicates, 15 % junk (random characters, repeated lines, web boilerplate, mojibake) and 2 %
HumanEval prompts inside clean documents. Copies are drawn from the clean records so far, so the
early documents are copied several times (several epochs' worth of them in the raw corpus).
"raw" is that corpus; "filtered" is it after the three `qwen2 data` verbs' own functions, in the
order a pipeline runs them: `dedup.dedup` (exact + MinHash near duplicates at Jaccard 0.8), then
`quality.filter_shards` (the default heuristics), then `decontaminate.decontaminate` (13-gram
overlap with HumanEval). The planted labels say what each stage removed.

Tokenizer and model: a byte-level BPE of --vocab tokens (control tokens included) trained on the raw
corpus (`qwen2.data.tokenizer_training.train_tokenizer`), shared by every run; Qwen2's architecture
at 4 layers, hidden 128, 4 query / 2 KV heads, SwiGLU 384, tied embeddings (0.79M non-embedding +
0.26M embedding parameters), RoPE base 10^4.

Part 1, raw vs filtered: `qwen2.train.pretrain` (from_scratch) on each corpus with each seed of
--seeds (0 and 1: the initial weights and the row order; a seed's two runs start from the same
weights), the same budget: --steps x --batch-size packed rows of --seq-len tokens (300 x 16 x 128 =
614,400 tokens), AdamW lr 3e-3 cosine to 3e-4, 15 warm-up steps, a checkpoint every --eval-every
(50) steps. Held-out loss of the initial model and of every checkpoint, per source, by
`qwen2.eval.perplexity.perplexity_of_documents` (windows of --seq-len every --seq-len/2, the first
--eval-tokens tokens of each source's held-out text); the headline is the mean over the five
sources (each weighs alike), averaged over the seeds; the gap is given per seed too.

Part 2, mixtures: the filtered corpus split by source into five files, trained as a mixture
(`data` = [{path, weight, name, heldout}, ...], pretrain's deficit sampler) with three weightings:
"natural" (the filtered corpus's own token shares), "uniform" (1/5 each) and "code-heavy" (Python
1/2, the others 1/8), with the budget and settings of part 1 and its first seed. Each source's
held-out file is pretrain's own `heldout`: its per-token loss (`heldout_loss/<name>` in the log,
packed rows of --seq-len) every --mixture-eval-every (100) steps; the realised shares are the log's
`share/<name>`. The final models are also scored as in part 1 (windowed), as a cross-check.

Output: <out>/heldout.jsonl, <out>/train-planted, <out>/stages/{raw,dedup,filter,decontaminate}, <out>/init,
<out>/data, <out>/runs/*, and benchmarks/results/pretraining_data.{md,json,png} (part 1) and
data_mixture.{md,json,png} (part 2); with --smoke: in <out>/results/. A rerun reuses what is done.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time

import torch

from benchmarks.common import (RESULTS_DIR, apply_preset, machine_facts, one_line_errors, read_records, save_png,
                               write_report)
from qwen2.errors import Qwen2Error
from qwen2.fileio import write_text_atomic

RESULTS = os.path.join(RESULTS_DIR, "pretraining_data")
MIXTURE_RESULTS = "data_mixture"
HELD_SEED, TRAIN_SEED = 41, 42
DOMAINS = ("translations", "man", "doc", "python", "plays")  # the planted corpus's clean sources
TRAIN_SHARES = {"exact_duplicate": 0.15, "normalized_duplicate": 0.05, "near_duplicate": 0.10, "junk": 0.15,
                "humaneval": 0.02}
HELD_DOC_CHARS = 3000
STAGES = ("raw", "dedup", "filter", "decontaminate")
MODEL = dict(layers=4, hidden=128, ffn=384, heads=4, kv_heads=2)
SMOKE_MODEL = dict(layers=2, hidden=64, ffn=128, heads=2, kv_heads=1)
FULL = dict(train_mb=4.0, heldout_kb=24, vocab=2048, steps=300, batch_size=16, seq_len=128, eval_every=50,
            mixture_eval_every=100, eval_tokens=4096, seeds="0,1")
SMOKE = dict(train_mb=0.4, heldout_kb=4, vocab=384, steps=16, batch_size=8, seq_len=64, eval_every=8,
             mixture_eval_every=8, eval_tokens=512, seeds="0,1")


# ---- records --------------------------------------------------------------------------------------

def write_records(path: str, records: list[dict], text_only: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"text": r["text"]} if text_only else r) + "\n" for r in records))
    return path


def kind(record: dict) -> str:
    """The record's planted kind, "clean" for a clean one."""
    return record["planted"]["kind"] if record.get("planted") else "clean"


def cut(text: str, limit: int) -> str:
    """`text`'s first `limit` characters, at a line end where there is one in the second half."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n", limit // 2, limit)
    return text[:end if end > 0 else limit]


# ---- corpora --------------------------------------------------------------------------------------

def heldout_documents(path: str, kb: float) -> dict[str, list[dict]]:
    """--heldout-kb of clean documents per source, drawn (once) before any training data."""
    from qwen2.data import planted

    if not os.path.exists(path):
        records = []
        for domain in DOMAINS:
            size = 0
            for doc in planted.clean_documents(HELD_SEED, {domain: 1.0}):
                text = cut(doc["text"], HELD_DOC_CHARS)
                records.append({**doc, "text": text})
                size += len(text.encode())
                if size >= kb * 1000:
                    break
        write_records(path, records)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return {d: [r for r in records if r["source"] == d] for d in DOMAINS}


def overlap_filter(records: list[dict], held: list[dict]) -> tuple[list[dict], dict]:
    """The training records that share nothing with the held-out text: not the same source file
    (origin and language), and under half of the word 5-grams of either side in common with any
    one held-out document. Returns (kept, {"origin": n, "text": n} dropped)."""
    from qwen2.data.planted import shingles

    keys = {(h["origin"], h.get("language")) for h in held}
    index: dict[str, list[int]] = collections.defaultdict(list)
    sizes = []
    for i, h in enumerate(held):
        s = shingles(h["text"])
        sizes.append(len(s))
        for g in s:
            index[g].append(i)
    kept, dropped = [], {"origin": 0, "text": 0}
    for r in records:
        if r.get("origin") and (r["origin"], r.get("language")) in keys:
            dropped["origin"] += 1
            continue
        s = shingles(r["text"])
        hits = collections.Counter(i for g in s for i in index.get(g, ()))
        if any(n >= 0.5 * min(len(s), sizes[i]) for i, n in hits.items()):
            dropped["text"] += 1
            continue
        kept.append(r)
    return kept, dropped


def planted_shares(junk: float | None) -> dict[str, float]:
    """TRAIN_SHARES, with --junk's share of junk records when given."""
    return TRAIN_SHARES if junk is None else {**TRAIN_SHARES, "junk": junk}


def stages(out: str, train_mb: float, held: list[dict], shares: dict[str, float]) -> tuple[dict[str, list[dict]], dict]:
    """The raw corpus (planted, held-out overlaps dropped) and its state after each `qwen2 data`
    stage, each a directory of shards under <out>/stages; the records of each, and the facts."""
    from qwen2.data import planted
    from qwen2.data.decontaminate import decontaminate
    from qwen2.data.dedup import dedup
    from qwen2.data.quality import filter_shards
    from qwen2.data.shards import RunOptions

    built = os.path.join(out, "train-planted")
    if not os.path.exists(os.path.join(built, "manifest.json")):
        planted.build(built, train_mb, seed=TRAIN_SEED, shares=shares)
    dirs = {s: os.path.join(out, "stages", s) for s in STAGES}
    facts_path = os.path.join(dirs["raw"], "overlap.json")
    if not os.path.exists(facts_path):
        kept, dropped = overlap_filter(read_records(built), held)
        write_records(os.path.join(dirs["raw"], "shard-00000.jsonl"), kept)
        write_text_atomic(facts_path, json.dumps({"dropped_for_heldout": dropped}) + "\n")
    with open(facts_path, encoding="utf-8") as f:
        facts = json.load(f)
    options = RunOptions(progress=False)
    seconds = {}
    for stage, before, run in (
            ("dedup", "raw", lambda i, o: dedup([i], o, options=options)),
            ("filter", "dedup", lambda i, o: filter_shards([i], o, options=options)),
            ("decontaminate", "filter", lambda i, o: decontaminate([i], o, options=options))):
        stats_path = os.path.join(dirs[stage], "stats.json")
        if not os.path.exists(stats_path):
            start = time.perf_counter()
            run(dirs[before], dirs[stage])
            seconds[stage] = round(time.perf_counter() - start, 1)
    facts["stage_seconds"] = seconds  # empty on a rerun that reused them
    return {s: read_records(d) for s, d in dirs.items()}, facts


def describe(records: list[dict], tokens: dict[str, int]) -> dict:
    """Documents, tokens and bytes of a corpus, by planted kind (and junk kind)."""
    by_kind: dict[str, dict] = {}
    for r in records:
        k = kind(r) if kind(r) != "junk" else f"junk:{r['planted']['junk']}"
        c = by_kind.setdefault(k, {"documents": 0, "tokens": 0, "bytes": 0})
        c["documents"] += 1
        c["tokens"] += tokens[r["id"]]
        c["bytes"] += len(r["text"].encode())
    total = sum(c["tokens"] for c in by_kind.values())
    junk = sum(c["tokens"] for k, c in by_kind.items() if k.startswith("junk"))
    return {"documents": len(records), "tokens": total, "bytes": sum(c["bytes"] for c in by_kind.values()),
            "junk_token_share": round(junk / total, 4) if total else 0.0,
            "by_kind": dict(sorted(by_kind.items()))}


# ---- tokenizer and model --------------------------------------------------------------------------

def prepare_model(args, arch: dict, texts: list[str]) -> str:
    """The starting directory every run shares: config, the trained tokenizer, the initial weights."""
    from qwen2.config import Qwen2Config
    from qwen2.data.tokenizer_training import CONTROL_TOKENS, train_tokenizer
    from qwen2.train.run import save_initial_model

    init_dir = os.path.join(args.out, "init")
    if not os.path.isdir(init_dir):
        tokenizer = train_tokenizer(texts, args.vocab - len(CONTROL_TOKENS))
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=arch["hidden"], intermediate_size=arch["ffn"],
                             num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                             num_key_value_heads=arch["kv_heads"], max_position_embeddings=args.seq_len,
                             rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
                             name=f"planted-{arch['layers']}x{arch['hidden']}")
        save_initial_model(init_dir, config, tokenizer, args.seeds[0])
    return init_dir


def options(args, init_dir: str, data, name: str, seed: int, **extra) -> dict:
    return {"model": init_dir, "from_scratch": True, "data": data, "output_dir": os.path.join(args.out, "runs", name),
            "seq_len": args.seq_len, "pack_documents": True, "batch_size": args.batch_size, "grad_accum": 1,
            "max_steps": args.steps, "lr": args.lr, "min_lr": args.lr / 10, "schedule": "cosine",
            "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.1, "grad_clip": 1.0,
            "adam_beta1": 0.9, "adam_beta2": 0.95, "precision": "fp32", "seed": seed, **extra}


def train(run_options: dict) -> list[dict]:
    """Train (or resume, or reuse a finished run); the run's log."""
    import qwen2.train
    from qwen2.train.run_dir import check_same_run, read_log

    out = run_options["output_dir"]
    check_same_run(out, run_options)
    if not (os.path.isdir(os.path.join(out, "model")) and len(read_log(out)) == run_options["max_steps"]):
        print(f"training {os.path.basename(out)} ...", flush=True)
        qwen2.train.pretrain(run_options, resume=True)
    return read_log(out)


# ---- evaluation -----------------------------------------------------------------------------------

class HeldOut:
    """The held-out documents of each source as token ids, and the windowed loss of a model on them."""

    def __init__(self, init_dir: str, held: dict[str, list[dict]], seq_len: int, max_tokens: int):
        from qwen2.data.tokenizer_training import END_OF_DOCUMENT
        from qwen2.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(init_dir)
        eod = tokenizer.token_to_id(END_OF_DOCUMENT)
        self.ids = {d: [tokenizer.encode(r["text"]) + [eod] for r in docs] for d, docs in held.items()}
        self.seq_len, self.max_tokens = seq_len, max_tokens

    @torch.no_grad()
    def loss(self, model) -> dict:
        from qwen2.eval.perplexity import perplexity_of_documents

        model.eval()
        by_domain, nll, scored = {}, 0.0, 0
        for d, ids in self.ids.items():
            p = perplexity_of_documents(model, ids, context=self.seq_len, stride=max(1, self.seq_len // 2),
                                        max_tokens=self.max_tokens)
            by_domain[d] = round(p.mean_nll, 5)
            nll, scored = nll + p.nll, scored + p.scored
        return {"loss": round(sum(by_domain.values()) / len(by_domain), 5), "pooled_loss": round(nll / scored, 5),
                "tokens_scored": scored, "by_domain": by_domain}


def load_weights(init_dir: str, weights_dir: str):
    from safetensors.torch import load_file

    from qwen2.checkpoint import build_model
    from qwen2.config import Qwen2Config

    config = Qwen2Config.from_json_file(os.path.join(init_dir, "config.json"))
    return build_model(config, load_file(os.path.join(weights_dir, "model.safetensors")))


def evaluate_checkpoints(run_options: dict, heldout: HeldOut, initial: dict) -> list[dict]:
    """Held-out loss at step 0 (`initial`, the shared starting weights) and at every checkpoint,
    cached in the run directory."""
    from qwen2.train import checkpoint as ckpt

    out = run_options["output_dir"]
    cache_path = os.path.join(out, "heldout_evals.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cache = {int(k): v for k, v in json.load(f).items()}
    for step, path in ckpt.list_checkpoints(out):
        if step in cache:
            continue
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            tokens_seen = json.load(f)["tokens_seen"]
        cache[step] = {"step": step, "tokens_seen": tokens_seen,
                       **heldout.loss(load_weights(run_options["model"], path))}
        print(f"{os.path.basename(out)} step {step}: held-out loss {cache[step]['loss']:.4f}", flush=True)
        write_text_atomic(cache_path, json.dumps({str(k): v for k, v in sorted(cache.items())}, indent=1) + "\n")
    return [{"step": 0, "tokens_seen": 0, **initial}] + [cache[k] for k in sorted(cache)]


# ---- the two parts --------------------------------------------------------------------------------

def arch_facts(args, arch: dict, init_dir: str) -> dict:
    from qwen2.config import Qwen2Config
    from qwen2.model import parameter_counts

    config = Qwen2Config.from_json_file(os.path.join(init_dir, "config.json"))
    return {**arch, "vocab_size": config.vocab_size, "seq_len": args.seq_len, "parameters": parameter_counts(config)}


def run_summary(log: list[dict], budget: int) -> dict:
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in log if r.get("tokens_per_s"))
    tokens = sum(r["tokens"] for r in log)
    return {"steps_done": len(log), "budget_tokens": budget, "tokens_seen": tokens,
            "train_seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "final_train_loss": round(sum(r["loss"] for r in log[-10:]) / len(log[-10:]), 4) if log else None}


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The seeds' held-out curves averaged point by point (the same steps in each)."""
    out = []
    for points in zip(*curves):
        n = len(points)
        out.append({"step": points[0]["step"], "tokens_seen": round(sum(p["tokens_seen"] for p in points) / n),
                    "loss": round(sum(p["loss"] for p in points) / len(points), 5),
                    "pooled_loss": round(sum(p["pooled_loss"] for p in points) / len(points), 5),
                    "by_domain": {d: round(sum(p["by_domain"][d] for p in points) / len(points), 5) for d in DOMAINS}})
    return out


def filter_part(args, ctx: dict) -> dict:
    """Part 1: raw vs filtered, same budget, same held-out text, each with every seed of --seeds."""
    corpora = ctx["corpora"]
    budget = args.steps * args.batch_size * args.seq_len
    runs = {}
    for name, stage in (("raw", "raw"), ("filtered", "decontaminate")):
        data = write_records(os.path.join(args.out, "data", f"{name}.jsonl"), ctx["records"][stage], text_only=True)
        seeds = {}
        for seed in args.seeds:
            o = options(args, ctx["init_dir"], data, f"{name}-seed{seed}", seed, save_every=args.eval_every,
                        keep_checkpoints=args.steps // args.eval_every + 1)
            log = train(o)
            curve = evaluate_checkpoints(o, ctx["heldout"], ctx["initial"](seed))
            seeds[str(seed)] = {**run_summary(log, budget), "heldout": curve, "final": curve[-1],
                                "train_log": [{"step": r["step"], "loss": round(r["loss"], 4), "tokens": r["tokens"]}
                                              for r in log]}
        tokens = corpora[stage]["tokens"] + corpora[stage]["documents"]  # and one <|endoftext|> each
        curve = mean_curve([x["heldout"] for x in seeds.values()])
        runs[name] = {"corpus_tokens": tokens, "budget_tokens": budget, "epochs": round(budget / tokens, 2),
                      "train_seconds": round(sum(x["train_seconds"] for x in seeds.values()), 1),
                      "heldout": curve, "final": curve[-1], "seeds": seeds}
    raw, filtered = runs["raw"], runs["filtered"]
    per_seed = {k: round(raw["seeds"][k]["final"]["loss"] - filtered["seeds"][k]["final"]["loss"], 5)
                for k in raw["seeds"]}
    return {"experiment": "pretraining_data", **ctx["common"], "seeds_run": list(args.seeds), "corpora": corpora,
            "runs": runs, "options": {k: v for k, v in o.items() if k not in ("model", "data", "output_dir", "seed")},
            "gap": {"loss": round(raw["final"]["loss"] - filtered["final"]["loss"], 5),
                    "pooled_loss": round(raw["final"]["pooled_loss"] - filtered["final"]["pooled_loss"], 5),
                    "by_domain": {d: round(raw["final"]["by_domain"][d] - filtered["final"]["by_domain"][d], 5)
                                  for d in DOMAINS},
                    "by_seed": per_seed},
            "filtered_lower": filtered["final"]["loss"] < raw["final"]["loss"],
            "filtered_lower_every_seed": all(g > 0 for g in per_seed.values())}


def mixtures(domain_tokens: dict[str, int]) -> dict[str, dict[str, float]]:
    total = sum(domain_tokens.values())
    code = {d: (0.5 if d == "python" else 0.5 / (len(DOMAINS) - 1)) for d in DOMAINS}
    return {"natural": {d: round(domain_tokens[d] / total, 4) for d in DOMAINS},
            "uniform": {d: round(1 / len(DOMAINS), 4) for d in DOMAINS},
            "code-heavy": code}


def mixture_part(args, ctx: dict) -> dict:
    """Part 2: three mixtures of the filtered corpus's sources, same budget, held-out loss per source."""
    from qwen2.train.config import TrainConfig

    if "eval_every" not in TrainConfig.__dataclass_fields__:
        raise Qwen2Error("the mixture sweep needs `qwen2 train pretrain` with data mixtures (data = [{path, weight, "
                         "name, heldout}], eval_every); this checkout has none: run --part filter")
    filtered = ctx["records"]["decontaminate"]
    left_out = sum(r.get("source") not in DOMAINS for r in filtered)  # junk the filters missed, if any
    files, held_files, domain_tokens = {}, {}, {}
    for d in DOMAINS:
        docs = [r for r in filtered if r.get("source") == d]
        files[d] = write_records(os.path.join(args.out, "data", "domains", f"{d}.jsonl"), docs, text_only=True)
        held_files[d] = write_records(os.path.join(args.out, "data", "heldout", f"{d}.jsonl"), ctx["held"][d],
                                      text_only=True)
        domain_tokens[d] = sum(ctx["tokens"][r["id"]] + 1 for r in docs)
    budget = args.steps * args.batch_size * args.seq_len
    runs = {}
    for name, weights in mixtures(domain_tokens).items():
        data = [{"path": files[d], "weight": weights[d], "name": d, "heldout": held_files[d]} for d in DOMAINS]
        o = options(args, ctx["init_dir"], data, f"mixture-{name}", args.seeds[0],
                    eval_every=args.mixture_eval_every, save_every=0, keep_checkpoints=1)
        log = train(o)
        evals = [{"step": r["step"], "tokens_seen": sum(x["tokens"] for x in log if x["step"] <= r["step"]),
                  "by_domain": {d: r[f"heldout_loss/{d}"] for d in DOMAINS}}
                 for r in log if r.get(f"heldout_loss/{DOMAINS[0]}") is not None]
        for e in evals:
            e["loss"] = sum(e["by_domain"].values()) / len(DOMAINS)
        shares = {d: log[-1][f"share/{d}"] for d in DOMAINS}
        windowed = ctx["heldout"].loss(load_weights(ctx["init_dir"], os.path.join(o["output_dir"], "model")))
        runs[name] = {**run_summary(log, budget), "weights": weights, "realised_shares": shares,
                      "epochs_by_domain": {d: round(shares[d] * runs_tokens(log) / domain_tokens[d], 2)
                                           for d in DOMAINS},
                      "heldout": evals, "final": evals[-1], "windowed_final": windowed}
    best = min(runs, key=lambda n: runs[n]["final"]["loss"])
    return {"experiment": "data_mixture", **ctx["common"], "domain_tokens": domain_tokens,
            "filtered_records_outside_domains": left_out,
            "options": {k: v for k, v in o.items() if k not in ("model", "data", "output_dir")},
            "seed": args.seeds[0], "runs": runs, "best": best,
            "best_by_domain": {d: min(runs, key=lambda n: runs[n]["final"]["by_domain"][d]) for d in DOMAINS},
            "best_windowed": min(runs, key=lambda n: runs[n]["windowed_final"]["loss"])}


def runs_tokens(log: list[dict]) -> int:
    return sum(r["tokens"] for r in log)


def context(args, arch: dict) -> dict:
    """What both parts share: the held-out text, the corpora after each stage, the tokenizer and
    starting weights, and the initial model's held-out loss."""
    from qwen2.tokenizer import Tokenizer

    held = heldout_documents(os.path.join(args.out, "heldout.jsonl"), args.heldout_kb)
    records, facts = stages(args.out, args.train_mb, [r for docs in held.values() for r in docs],
                            planted_shares(args.junk))
    init_dir = prepare_model(args, arch, [r["text"] for r in records["raw"]])
    tokenizer = Tokenizer.from_dir(init_dir)
    tokens = {r["id"]: len(tokenizer.encode(r["text"])) for r in records["raw"]}
    corpora = {s: describe(records[s], tokens) for s in STAGES}
    raw_ids = {r["id"] for r in records["raw"]}
    for s in STAGES[1:]:
        assert {r["id"] for r in records[s]} <= raw_ids, f"stage {s} made records"
    heldout = HeldOut(init_dir, held, args.seq_len, args.eval_tokens)
    initials: dict[int, dict] = {}

    def initial(seed: int) -> dict:
        """The held-out loss of the weights from_scratch=true starts from with `seed`."""
        if seed not in initials:
            from qwen2.config import Qwen2Config
            from qwen2.train.run import scratch_model

            config = Qwen2Config.from_json_file(os.path.join(init_dir, "config.json"))
            initials[seed] = heldout.loss(scratch_model(config, seed))
        return initials[seed]

    common = {"machine": machine_facts(threads=args.threads), "model": arch_facts(args, arch, init_dir),
              "heldout": {d: {"documents": len(docs), "bytes": sum(len(r["text"].encode()) for r in docs),
                              "tokens": sum(len(ids) for ids in heldout.ids[d])} for d, docs in held.items()},
              "eval_tokens_per_domain": args.eval_tokens, "overlap": facts, "train_mb": args.train_mb,
              "planted_shares": planted_shares(args.junk), "seeds": {"heldout": HELD_SEED, "train": TRAIN_SEED},
              "torch": torch.__version__}
    return {"held": held, "records": records, "tokens": tokens, "corpora": corpora, "init_dir": init_dir,
            "heldout": heldout, "initial": initial, "common": common}


# ---- reports --------------------------------------------------------------------------------------

KIND_COLUMNS = ("clean", "exact_duplicate", "normalized_duplicate", "near_duplicate", "junk", "humaneval")


def kind_count(corpus: dict, k: str, what: str = "documents") -> int:
    return sum(c[what] for name, c in corpus["by_kind"].items() if name == k or name.startswith(k + ":"))


def model_line(s: dict) -> str:
    m, p = s["model"], s["model"]["parameters"]
    o = s["options"]
    return (f"Model: {m['layers']} layers, hidden {m['hidden']}, {m['heads']} query / {m['kv_heads']} KV heads, "
            f"SwiGLU {m['ffn']}, tied embeddings, BPE vocabulary {m['vocab_size']:,} trained on the raw corpus: "
            f"{p['non_embedding']:,} non-embedding + {p['embedding']:,} embedding parameters. Every run: "
            f"{o['max_steps']} steps x {o['batch_size']} x {o['seq_len']} packed tokens "
            f"({o['max_steps'] * o['batch_size'] * o['seq_len']:,}), AdamW lr {o['lr']:g} cosine to {o['min_lr']:g}, "
            f"from the same initial weights, {s['machine']['threads']} thread(s) on {s['machine']['cpu']}.")


def heldout_line(s: dict) -> str:
    h = s["heldout"]
    return ("Held-out text (seed 41, drawn first, never trained on): "
            + ", ".join(f"{d} {v['documents']} documents / {v['tokens']:,} tokens" for d, v in h.items())
            + f"; the first {s['eval_tokens_per_domain']:,} tokens of each source are scored (windows of "
            f"{s['model']['seq_len']}, stride {s['model']['seq_len'] // 2}). Training records dropped for sharing a "
            f"source file or text with it: {s['overlap']['dropped_for_heldout']['origin']} by file, "
            f"{s['overlap']['dropped_for_heldout']['text']} by text.")


def markdown_filter(s: dict, smoke: bool) -> str:
    c, r, g = s["corpora"], s["runs"], s["gap"]
    raw, filt = r["raw"]["final"], r["filtered"]["final"]
    seeds = list(r["raw"]["seeds"])
    verdict = ("the filtered run reaches the lower held-out loss" if s["filtered_lower"]
               else "the filtered run does NOT reach the lower held-out loss")
    every = (f"with every seed ({', '.join(f'{v:+.4f}' for v in g['by_seed'].values())})"
             if s["filtered_lower_every_seed"] else
             f"but not with every seed ({', '.join(f'seed {k} {v:+.4f}' for k, v in g['by_seed'].items())})")
    lines = ["# Filtered vs raw pre-training data, same token budget (CPU)" + (" — SMOKE RUN" if smoke else ""), "",
             "Written by `python -m benchmarks.experiments.pretraining_data_experiment` (its docstring has the "
             "method), through `qwen2.train.pretrain` and the `qwen2 data` verbs' own functions. " + model_line(s)
             + f" Each corpus is trained with {len(seeds)} seed(s) ({', '.join(seeds)}: initial weights and row "
             "order; a seed's raw and filtered runs start from the same weights).",
             "", f"**Result: {verdict}: {filt['loss']:.4f} vs {raw['loss']:.4f} nats/token (mean over the five "
             f"sources and the seeds), a gap of {g['loss']:+.4f}**, {every}; pooled over all scored tokens "
             f"{g['pooled_loss']:+.4f}.", ""]
    if len(seeds) > 1:
        spread = {n: max(x["final"]["loss"] for x in r[n]["seeds"].values())
                  - min(x["final"]["loss"] for x in r[n]["seeds"].values()) for n in ("raw", "filtered")}
        agree = []
        for i, point in enumerate(r["raw"]["heldout"][1:], 1):
            signs = {math.copysign(1, r["raw"]["seeds"][k]["heldout"][i]["loss"]
                                   - r["filtered"]["seeds"][k]["heldout"][i]["loss"]) for k in seeds}
            if len(signs) == 1:
                agree.append(f"{point['step']} ({'filtered' if signs.pop() > 0 else 'raw'} lower)")
        lines += [f"Noise: the final held-out loss of one corpus moves by {spread['raw']:.4f} (raw) and "
                  f"{spread['filtered']:.4f} (filtered) from one seed to the other, against a mean gap of "
                  f"{g['loss']:+.4f}. Steps at which every seed agrees on the sign of the gap: "
                  + (", ".join(agree) if agree else "none") + ".", ""]
    lines += ["## The corpora", "",
             f"Planted corpus of {s['train_mb']:g} MB (seed {s['seeds']['train']}, planted shares "
             + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in s["planted_shares"].items())
             + "), minus the records that overlap the held-out text; then each stage of the pipeline. Documents "
             "by planted label (ground truth), tokens of the shared tokenizer:", "",
             "| stage | documents | tokens | junk share of tokens | clean | exact dup | normalized dup | near dup | "
             "junk | HumanEval |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        x = c[stage]
        lines.append(f"| {stage if stage == 'raw' else 'after ' + stage} | {x['documents']:,} | {x['tokens']:,} | "
                     f"{100 * x['junk_token_share']:.1f} % | "
                     + " | ".join(str(kind_count(x, k)) for k in KIND_COLUMNS) + " |")
    dup_tokens = sum(kind_count(c["raw"], k, "tokens") for k in KIND_COLUMNS[1:4])
    lines += ["", f"Of the raw corpus's {c['raw']['tokens']:,} tokens, {dup_tokens:,} "
              f"({100 * dup_tokens / c['raw']['tokens']:.1f} %) are planted copies and "
              f"{100 * c['raw']['junk_token_share']:.1f} % junk; filtering keeps {c['decontaminate']['tokens']:,} "
              f"tokens ({100 * c['decontaminate']['tokens'] / c['raw']['tokens']:.1f} %). The budget is "
              f"{r['raw']['epochs']:g} epochs of the raw corpus and {r['filtered']['epochs']:g} of the filtered one.",
              "", heldout_line(s), "", "## Held-out loss", "",
              "| run | seed | tokens trained | held-out loss (mean of sources) | " + " | ".join(DOMAINS)
              + " | final training loss | s |", "|---|---|---:|---:|" + "---:|" * len(DOMAINS) + "---:|---:|"]
    for name in ("raw", "filtered"):
        for seed, x in r[name]["seeds"].items():
            lines.append(f"| {name} | {seed} | {x['tokens_seen']:,} | {x['final']['loss']:.4f} | "
                         + " | ".join(f"{x['final']['by_domain'][d]:.4f}" for d in DOMAINS)
                         + f" | {x['final_train_loss']} | {x['train_seconds']:.0f} |")
        if len(seeds) > 1:
            lines.append(f"| **{name}** | mean | | **{r[name]['final']['loss']:.4f}** | "
                         + " | ".join(f"{r[name]['final']['by_domain'][d]:.4f}" for d in DOMAINS) + " | | |")
    for seed in seeds:
        a, b = r["raw"]["seeds"][seed]["final"], r["filtered"]["seeds"][seed]["final"]
        lines.append(f"| raw − filtered | {seed} | | {a['loss'] - b['loss']:+.4f} | "
                     + " | ".join(f"{a['by_domain'][d] - b['by_domain'][d]:+.4f}" for d in DOMAINS) + " | | |")
    if len(seeds) > 1:
        lines.append(f"| **raw − filtered** | mean | | **{g['loss']:+.4f}** | "
                     + " | ".join(f"{g['by_domain'][d]:+.4f}" for d in DOMAINS) + " | | |")
    lines += ["", "Held-out loss along the way (mean of the sources and seeds; step 0 is the initial weights):", "",
              "| step | tokens | raw | filtered | raw − filtered | " + " | ".join(f"seed {k}" for k in seeds) + " |",
              "|---:|---:|---:|---:|---:|" + "---:|" * len(seeds)]
    for i, (a, b) in enumerate(zip(r["raw"]["heldout"], r["filtered"]["heldout"])):
        per = [r["raw"]["seeds"][k]["heldout"][i]["loss"] - r["filtered"]["seeds"][k]["heldout"][i]["loss"]
               for k in seeds]
        lines.append(f"| {a['step']} | {a['tokens_seen']:,} | {a['loss']:.4f} | {b['loss']:.4f} | "
                     f"{a['loss'] - b['loss']:+.4f} | " + " | ".join(f"{v:+.4f}" for v in per) + " |")
    lines += ["", "Losses in nats per token of this tokenizer. The training losses are not comparable across runs: "
              "they are on different text (the raw run's includes junk and copies)."]
    return "\n".join(lines) + "\n"


def plot_filter(s: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.3))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    colors = {"raw": "tab:red", "filtered": "tab:green"}
    for name, run in s["runs"].items():
        for seed in run["seeds"].values():
            curve = seed["heldout"][1:]
            left.plot([e["tokens_seen"] / 1e6 for e in curve], [e["loss"] for e in curve], color=colors[name],
                      alpha=0.3, lw=0.8)
        curve = run["heldout"][1:]
        left.plot([e["tokens_seen"] / 1e6 for e in curve], [e["loss"] for e in curve], "o-", color=colors[name],
                  label=f"{name} ({run['corpus_tokens'] / 1e6:.2f}M-token corpus): {run['final']['loss']:.3f}")
    left.set(xlabel="tokens trained (millions)", ylabel="held-out loss, mean of 5 sources (nats/token)",
             title=f"Same budget, same held-out text: gap {s['gap']['loss']:+.3f}\n"
                   f"(mean of {len(s['seeds_run'])} seeds, bold; each seed, faint)")
    left.grid(alpha=0.3)
    left.legend()
    x = range(len(DOMAINS))
    for i, name in enumerate(("raw", "filtered")):
        right.bar([j + (i - 0.5) * 0.38 for j in x], [s["runs"][name]["final"]["by_domain"][d] for d in DOMAINS],
                  width=0.38, color=colors[name], label=name)
    right.set_xticks(list(x), DOMAINS)
    lows = [min(s["runs"][n]["final"]["by_domain"][d] for n in ("raw", "filtered")) for d in DOMAINS]
    right.set_ylim(bottom=max(0.0, min(lows) - 0.5))
    right.set(ylabel="final held-out loss (nats/token)", title="By source (mean of the seeds)")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    save_png(fig, path)


def markdown_mixture(s: dict, smoke: bool) -> str:
    r = s["runs"]
    by_source = {d: [x["final"]["by_domain"][d] for x in r.values()] for d in DOMAINS}
    lines = ["# Three data mixtures, same budget: held-out loss per source (CPU)" + (" — SMOKE RUN" if smoke else ""),
             "", "Written by `python -m benchmarks.experiments.pretraining_data_experiment` (part 2; its docstring has "
             "the method): the filtered corpus of part 1 split by source, trained as a mixture through "
             "`qwen2.train.pretrain` (data = [{path, weight, name, heldout}], deficit sampling), each source's "
             "held-out file scored by pretrain itself (`heldout_loss/<source>`, packed rows). " + model_line(s), "",
             heldout_line(s), "",
             "Filtered tokens per source (the \"natural\" mixture's shares): "
             + ", ".join(f"{d} {n:,}" for d, n in s["domain_tokens"].items()) + ".", "",
             "| mixture | weights (" + ", ".join(DOMAINS) + ") | realised shares | "
             + " | ".join(DOMAINS) + " | mean | windowed mean |", "|---|---|---|" + "---:|" * (len(DOMAINS) + 2)]
    for name, x in r.items():
        best = {d for d in DOMAINS if s["best_by_domain"][d] == name}
        cells = [f"**{x['final']['by_domain'][d]:.4f}**" if d in best else f"{x['final']['by_domain'][d]:.4f}"
                 for d in DOMAINS]
        mean = f"**{x['final']['loss']:.4f}**" if name == s["best"] else f"{x['final']['loss']:.4f}"
        lines.append(f"| {name} | " + " / ".join(f"{x['weights'][d]:.2f}" for d in DOMAINS) + " | "
                     + " / ".join(f"{x['realised_shares'][d]:.3f}" for d in DOMAINS) + " | " + " | ".join(cells)
                     + f" | {mean} | {x['windowed_final']['loss']:.4f} |")
    lines += ["", f"Lowest mean held-out loss: **{s['best']}** (by the windowed scoring of part 1: "
              f"{s['best_windowed']}). Bold: the best mixture for each source. Epochs of each source's filtered text "
              "read: " + "; ".join(f"{n}: " + ", ".join(f"{d} {e:g}" for d, e in x["epochs_by_domain"].items())
                                   for n, x in r.items()) + ".", "",
              f"One seed ({s['seed']}) per mixture: part 1's \"Noise\" line (pretraining_data.md) says how far "
              "another seed moves a run's final loss at this budget; a difference of a few hundredths in the mean "
              "is within it, while the per-source effects of a share are larger (per source, the spread over the "
              "mixtures: " + ", ".join(f"{d} {max(v) - min(v):.3f}" for d, v in by_source.items()) + ").", "",
              "Losses in nats per token of the shared tokenizer. A source's loss falls with its share until its "
              "text repeats; the mean weighs the five sources alike, which is itself a choice of target."]
    return "\n".join(lines) + "\n"


def plot_mixture(s: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.3))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    colors = dict(zip(s["runs"], ("tab:blue", "tab:orange", "tab:purple")))
    for name, run in s["runs"].items():
        left.plot([e["tokens_seen"] / 1e6 for e in run["heldout"]], [e["loss"] for e in run["heldout"]], "o-",
                  color=colors[name], label=f"{name}: {run['final']['loss']:.3f}")
    left.set(xlabel="tokens trained (millions)", ylabel="held-out loss, mean of 5 sources (nats/token)",
             title="Mixtures, same budget")
    left.grid(alpha=0.3)
    left.legend()
    width = 0.8 / len(s["runs"])
    for i, (name, run) in enumerate(s["runs"].items()):
        right.bar([j + (i - (len(s["runs"]) - 1) / 2) * width for j in range(len(DOMAINS))],
                  [run["final"]["by_domain"][d] for d in DOMAINS], width=width, color=colors[name], label=name)
    right.set_xticks(list(range(len(DOMAINS))), DOMAINS)
    lows = [min(run["final"]["by_domain"][d] for run in s["runs"].values()) for d in DOMAINS]
    right.set_ylim(bottom=max(0.0, min(lows) - 0.5))
    right.set(ylabel="final held-out loss (nats/token)", title="By source")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    save_png(fig, path)


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny corpus and model, results in <out>/results")
    ap.add_argument("--part", choices=["both", "filter", "mixture"], default="both")
    ap.add_argument("--out", default=None, help="run directory (default runs/pretraining-data[-smoke])")
    ap.add_argument("--results", default=None, help="path stem of part 1's .md/.json/.png (default benchmarks/"
                                                    "results/pretraining_data); part 2's is data_mixture beside it")
    ap.add_argument("--train-mb", type=float, help=f"planted training corpus size (default {FULL['train_mb']})")
    ap.add_argument("--heldout-kb", type=float, help=f"held-out text per source (default {FULL['heldout_kb']} KB)")
    ap.add_argument("--vocab", type=int, help=f"tokenizer size, control tokens included (default {FULL['vocab']})")
    ap.add_argument("--steps", type=int, help=f"optimizer steps of every run (default {FULL['steps']})")
    ap.add_argument("--batch-size", type=int, help=f"packed rows per step (default {FULL['batch_size']})")
    ap.add_argument("--seq-len", type=int, help=f"tokens per row and evaluation window (default {FULL['seq_len']})")
    ap.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations (default {FULL['eval_every']})")
    ap.add_argument("--mixture-eval-every", type=int, help="steps between part 2's held-out evaluations (default "
                                                           f"{FULL['mixture_eval_every']})")
    ap.add_argument("--eval-tokens", type=int,
                    help=f"held-out tokens scored per source (default {FULL['eval_tokens']})")
    ap.add_argument("--junk", type=float, default=None,
                    help=f"share of junk records planted (default {TRAIN_SHARES['junk']}); use a fresh --out")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", help=f"comma-separated seeds (initial weights and row order) of part 1's runs; part 2 "
                                    f"uses the first (default {FULL['seeds']})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "pretraining-data", RESULTS)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise Qwen2Error(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not args.seeds:
        raise Qwen2Error("--seeds needs at least one seed")
    if args.steps < 1 or min(args.eval_every, args.mixture_eval_every) < 1 or args.steps % args.eval_every:
        raise Qwen2Error("--steps, --eval-every and --mixture-eval-every must be at least 1, and --steps a multiple of "
                         "--eval-every")
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    ctx = context(args, SMOKE_MODEL if args.smoke else MODEL)
    if args.part in ("both", "filter"):
        summary = filter_part(args, ctx)
        summary["invocation_seconds"] = round(time.perf_counter() - start, 1)  # a rerun reuses what is done
        write_report(summary, args.results, args.smoke, markdown_filter, plot_filter)
    if args.part in ("both", "mixture"):
        summary = mixture_part(args, ctx)
        summary["invocation_seconds"] = round(time.perf_counter() - start, 1)  # a rerun reuses what is done
        write_report(summary, os.path.join(os.path.dirname(args.results), MIXTURE_RESULTS), args.smoke,
                     markdown_mixture, plot_mixture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
