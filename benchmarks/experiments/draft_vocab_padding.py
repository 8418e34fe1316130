"""A draft with fewer vocabulary rows than its target, on real models: the 0.5B drafts for a padded 1.5B.

Qwen2's 0.5B/1.5B/3B pad the vocabulary to 151,936 rows, the 7B and 72B to 152,064; the tokenizer is
the same. Here the real Qwen2.5-Coder-1.5B gets the 7B's shape: its embedding and lm_head padded to
152,064 rows with zero rows (an embedding row of zeros; a head row of zeros gives the logit 0, which
never wins while the largest real logit is positive: the minimum over the run of that largest logit is
reported). The real 0.5B (151,936 rows) drafts for it. Checked, per prompt:

  1. the padded 1.5B's plain greedy tokens equal the unpadded 1.5B's (padding changes nothing);
  2. speculative decoding with the 0.5B as draft (`DraftModelDrafter`, k tokens per target forward)
     gives exactly the padded 1.5B's plain greedy tokens, and `Qwen2.generate(..., draft_model=)` the
     same text (through the API's vocabulary and tokenizer checks);
  3. no drafted id is beyond the draft's 151,936 rows.

Both models are the registry GGUFs quantised at load (--quantize, default int4: loads in seconds; the
identity does not depend on the weights, every emitted token is the target's own greedy choice). The
padding wraps the two modules (`ZeroPaddedEmbedding`, `ZeroPaddedHead`), as a zero-padded weight
would compute, so the 1.5B's 4-bit blocks stay as they are. Decode speeds are reported too (noisy on a
shared machine). tests/test_speculative.py runs it on one prompt (~15 s).

    python -m benchmarks.experiments.draft_vocab_padding                     # 6 prompts x 64 tokens, ~5 min
    python -m benchmarks.experiments.draft_vocab_padding --prompts 2 --new-tokens 12 --out /tmp/dvp.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, command_line, machine_facts, write_results

MODULE = "benchmarks.experiments.draft_vocab_padding"
DRAFT, TARGET = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PADDED_ROWS = 152064  # Qwen2-7B / 72B's vocabulary rows

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import json\n\n\ndef load_config(path):\n",
    "class LinkedList:\n    def __init__(self):\n        self.head = None\n\n    def append(self, value):\n",
    "# Sort a list of dictionaries by the 'age' key\npeople = [{'name': 'Ann', 'age': 31}, {'name': 'Bo', 'age': 25}]\n",
    "SELECT name, COUNT(*) FROM orders\n",
    "def is_palindrome(s: str) -> bool:\n",
]


class ZeroPaddedEmbedding(nn.Module):
    """`inner` with zero rows appended: ids past its rows embed to zeros."""

    def __init__(self, inner: nn.Module, known_rows: int):
        super().__init__()
        self.inner, self.known_rows = inner, known_rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = ids < self.known_rows
        return self.inner(torch.where(known, ids, 0)) * known.unsqueeze(-1)


class ZeroPaddedHead(nn.Module):
    """`inner` with zero weight rows appended: their logits are 0."""

    def __init__(self, inner: nn.Module, extra_rows: int):
        super().__init__()
        self.inner, self.extra_rows = inner, extra_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.inner(x), (0, self.extra_rows))


def pad_vocabulary(m, rows: int) -> None:
    """Give the loaded model `m` a vocabulary of `rows` rows, the new ones zero."""
    model = m.model
    known = model.config.vocab_size
    model.model.embed_tokens = ZeroPaddedEmbedding(model.model.embed_tokens, known)
    model.lm_head = ZeroPaddedHead(model.lm_head, rows - known)
    model.config = dataclasses.replace(model.config, vocab_size=rows)


def greedy_tokens(m, ids: list[int], n: int) -> tuple[list[int], float]:
    from qwen2.runtime.generate import SamplingParams, decode_steps

    start = time.perf_counter()
    tokens = [int(t) for t in decode_steps(m.decoder, [ids], SamplingParams(max_new_tokens=n))]
    return tokens, time.perf_counter() - start


def smallest_top_real_logit(m, ids: list[int], tokens: list[int], real_rows: int) -> float:
    """The smallest, over the positions that chose `tokens`, of the largest real-row logit (one forward)."""
    with torch.inference_mode():
        logits = m.decoder(torch.tensor([ids + tokens[:-1]]))[0, len(ids) - 1:]
    return float(logits[:, :real_rows].max(-1).values.min())


class CountingDrafter:
    """Wraps a drafter's `propose` to keep the largest id it ever proposed."""

    def __init__(self, drafter):
        self.drafter, self.largest = drafter, -1
        inner = drafter.propose

        def propose(tokens, k):
            draft = inner(tokens, k)
            self.largest = max([self.largest, *draft])
            return draft
        drafter.propose = propose


def main(argv: list[str] | None = None) -> dict:
    """Run the check; the results (also written to --out). A mismatch raises SystemExit after writing."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=5, help="k: tokens drafted per target forward")
    ap.add_argument("--quantize", default="int4", help="int4, int8, or none (fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "draft_vocab_padding.json"))
    args = ap.parse_args(argv)

    import qwen2
    from qwen2.runtime.speculative import DraftModelDrafter, speculative_steps
    from qwen2.runtime.generate import SamplingParams

    torch.set_num_threads(args.threads)
    quantize = None if args.quantize in ("none", "fp32") else args.quantize
    draft = qwen2.load(DRAFT, quantize=quantize, progress=False)
    target = qwen2.load(TARGET, quantize=quantize, progress=False)
    real_rows = target.config.vocab_size
    prompts = PROMPTS[:args.prompts]
    encoded = [target.tokenizer.encode(p) for p in prompts]
    unpadded = [greedy_tokens(target, ids, args.new_tokens)[0] for ids in encoded]
    pad_vocabulary(target, PADDED_ROWS)
    print(f"target vocabulary {real_rows} -> {target.config.vocab_size} rows, draft {draft.config.vocab_size}",
          file=sys.stderr)

    # warm-up of the draft's path (its first forwards), so that the first row's speed is not its cold start
    list(speculative_steps(target.decoder, encoded[0], SamplingParams(max_new_tokens=4), DraftModelDrafter(draft, 2)))
    rows = []
    for prompt, ids, before in zip(prompts, encoded, unpadded):
        plain, plain_s = greedy_tokens(target, ids, args.new_tokens)
        drafter = CountingDrafter(DraftModelDrafter(draft, args.draft_tokens))
        start = time.perf_counter()
        speculative = [int(t) for t in speculative_steps(target.decoder, ids, SamplingParams(max_new_tokens=args.new_tokens),
                                                         drafter.drafter)]
        speculative_s = time.perf_counter() - start
        text_plain = target.generate(prompt, max_new_tokens=args.new_tokens)
        text_drafted = target.generate(prompt, max_new_tokens=args.new_tokens, draft_model=draft,
                                       num_draft_tokens=args.draft_tokens)
        stats = drafter.drafter.stats
        row = {"prompt": prompt, "padded_equals_unpadded": plain == before, "speculative_equals_plain": speculative == plain,
               "api_text_equals_plain": text_drafted == text_plain, "largest_drafted_id": drafter.largest,
               "smallest_top_real_logit": round(smallest_top_real_logit(target, ids, plain, real_rows), 3),
               "accepted": stats.accepted, "proposed": stats.proposed, "target_forwards": stats.target_forwards,
               "plain_tok_s": round(len(plain) / plain_s, 2), "speculative_tok_s": round(len(speculative) / speculative_s, 2)}
        rows.append(row)
        print(row, file=sys.stderr)

    ok = all(r["padded_equals_unpadded"] and r["speculative_equals_plain"] and r["api_text_equals_plain"]
             and r["largest_drafted_id"] < draft.config.vocab_size for r in rows)
    accepted, proposed = sum(r["accepted"] for r in rows), sum(r["proposed"] for r in rows)
    lines = [f"# A 151,936-row draft for a 152,064-row target: {DRAFT} drafts for {TARGET} padded", "",
             f"{len(rows)} code prompts, {args.new_tokens} new tokens each, greedy, k = {args.draft_tokens}, "
             f"both models {quantize or 'fp32'} from the registry GGUFs; the 1.5B's embedding and lm_head padded "
             f"from {real_rows:,} to {PADDED_ROWS:,} rows with zero rows. "
             f"**{'All identical' if ok else 'MISMATCH'}.**", "",
             "| prompt | padded = unpadded | drafted = plain | API text = plain | largest drafted id | "
             "min top real logit | accepted | target forwards | plain tok/s | drafted tok/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['prompt'].splitlines()[0][:40]}` | {r['padded_equals_unpadded']} | "
                     f"{r['speculative_equals_plain']} | {r['api_text_equals_plain']} | {r['largest_drafted_id']} | "
                     f"{r['smallest_top_real_logit']} | {r['accepted']}/{r['proposed']} | {r['target_forwards']} | "
                     f"{r['plain_tok_s']} | {r['speculative_tok_s']} |")
    lines += ["", f"Draft tokens accepted overall: {accepted}/{proposed}"
                  f"{f' ({100 * accepted / proposed:.0f} %)' if proposed else ''}. The padded rows' logit is 0 and the "
                  "largest real logit stays above it at every step (min top real logit > 0), so they never win, and "
                  "the draft cannot propose them. tok/s: new tokens / seconds, prefill included; on a shared machine "
                  "indicative only.",
              "", f"Made with `{command_line(MODULE, argv)}`."]
    results = {"draft": DRAFT, "target": TARGET, "padded_rows": PADDED_ROWS, "real_rows": real_rows,
               "quantize": quantize, "new_tokens": args.new_tokens, "draft_tokens": args.draft_tokens,
               "all_identical": ok, "rows": rows, "machine": machine_facts(args.threads),
               "command": command_line(MODULE, argv)}
    write_results(args.out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not ok:
        raise SystemExit("a drafted decode differs from the target's greedy decode")
    return results


if __name__ == "__main__":
    main()
