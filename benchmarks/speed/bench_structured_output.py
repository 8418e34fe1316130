"""Structured output on the real model (Qwen2.5-Coder-0.5B-Instruct, int4): do constrained replies
parse and validate, through the Python API and through `qwen2 serve` with the openai client
(non-streamed and streamed), and what does the constraint cost in decode speed.

    python -m benchmarks.speed.bench_structured_output          # 200 schemas + tool calls, speed at batch 1 and 8
    python -m benchmarks.speed.bench_structured_output --schemas 10 --max-new-tokens 32 \\
        --questions 2 --speed-tokens 16 --repeats 1 --wait-quiet 0 --out /tmp/structured.json   # a quick check

Validity (greedy): `--schemas` seeded schemas from benchmarks/schema_fuzzer.py (nested objects,
bounded arrays, enums, ranges, optional properties, anyOf; a third of the strings unbounded), each
asked for in a chat prompt that shows the schema:
  * API: `Qwen2.generate(prompts, json_schema=[...])`, --batch prompts per call;
  * server: /v1/chat/completions with response_format json_schema, --batch requests at a time,
    non-streamed and streamed.
A reply the server finishes ("stop") must parse and validate (`jsonschema`); one cut at
--max-new-tokens ("length") is counted apart. The API gives no finish reason: its replies are
compared with the server's, which decodes the same greedy tokens. Tool calls: each of QUESTIONS with
tool_choice naming its tool and with "required", through the server (both ways) and the API
(`grammar=tool_call_grammar(...)`): every call parsed back and its arguments valid under its tool's
parameters.

Speed: decode tok/s (`decode_steps`, --speed-tokens steps after the prefill, median of --repeats,
plain and constrained runs alternating) of a JSON-schema-constrained decode (SPEED_SCHEMA, a list
of 64 records that no row finishes within the run, so every step is inside the grammar) against the
same prompts unconstrained, at batch 1 and batch 8; and llama.cpp's grammar-constrained decode
(`llama_cpp.LlamaGrammar.from_json_schema`, same schema, batch 1) against its own unconstrained
decode where llama-cpp-python is installed (else the rows say so).

Results: benchmarks/results/structured_output.json and .md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

from benchmarks.common import (RESULTS_DIR, CpuWatch, command_line, machine_facts, one_line_errors,
                               set_torch_threads, wait_for_quiet, write_results)
from benchmarks.schema_fuzzer import fuzzed_schemas

MODEL = "qwen2.5-coder-0.5b-instruct"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the documentation",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80},
                                                        "limit": {"type": "integer", "minimum": 1, "maximum": 20}},
                       "required": ["query"], "additionalProperties": False}}},
]
QUESTIONS = [("What is the weather in Paris?", "get_weather"),
             ("Is it cold in Oslo right now, in fahrenheit?", "get_weather"),
             ("How warm is it in Tokyo?", "get_weather"), ("What is 17 plus 25?", "add"), ("Add 1000 and -3.", "add"),
             ("Compute 4 + 9 for me.", "add"), ("Find the docs about list comprehensions.", "search_docs"),
             ("Search the documentation for 'asyncio timeouts', 5 results.", "search_docs"),
             ("Where is the section on decorators?", "search_docs"),
             ("Weather in Buenos Aires, please.", "get_weather")]
SPEED_SCHEMA = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                     "name": {"type": "string", "maxLength": 32},
                                     "score": {"type": "number", "minimum": 0, "maximum": 100},
                                     "tags": {"type": "array", "items": {"enum": ["new", "old", "hot", "cold"]},
                                              "maxItems": 3}},
    "required": ["id", "name", "score", "tags"], "additionalProperties": False}}},
    "required": ["rows"], "additionalProperties": False}
TOPICS = ["cities", "books", "planets", "rivers", "programming languages", "birds", "composers", "mountains"]


def schema_prompt(schema: dict) -> str:
    return "Reply with a JSON object that follows this JSON schema, nothing else:\n" + json.dumps(schema)


def verdict(text: str, schema: dict) -> str:
    """valid / invalid (parses, breaks the schema) / unparsed."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "unparsed"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return "invalid"
    return "valid"


# ---- validity --------------------------------------------------------------------------------------

def api_replies(m, schemas: list[dict], args) -> list[str]:
    prompts = [m.tokenizer.apply_chat_template([{"role": "user", "content": schema_prompt(s)}],
                                               add_generation_prompt=True, tokenize=False) for s in schemas]
    out = []
    for at in range(0, len(schemas), args.batch):
        out += m.generate(prompts[at:at + args.batch], json_schema=schemas[at:at + args.batch],
                          max_new_tokens=args.max_new_tokens, temperature=0)
        print(f"  API: {len(out)}/{len(schemas)}", file=sys.stderr, flush=True)
    return out


def server_reply(client, model: str, stream: bool, max_tokens: int, **request) -> tuple[str, str, list]:
    """(content, finish_reason, [(name, arguments)]) of one greedy chat completion."""
    if not stream:
        choice = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, **request).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content or "", choice.finish_reason, calls
    content, reason, calls = "", None, []
    for chunk in client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                                **request):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += [(c.function.name, c.function.arguments) for c in delta.tool_calls or []]
        reason = chunk.choices[0].finish_reason or reason
    return content, reason, calls


def server_schema_replies(client, model: str, schemas: list[dict], stream: bool, args) -> list[tuple]:
    def one(i):
        fmt = {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": schemas[i], "strict": True}}
        return server_reply(client, model, stream, args.max_new_tokens, response_format=fmt,
                            messages=[{"role": "user", "content": schema_prompt(schemas[i])}])[:2]

    with concurrent.futures.ThreadPoolExecutor(args.batch) as pool:
        return list(pool.map(one, range(len(schemas))))


def tool_checks(m, client, model: str, args) -> list[dict]:
    import jsonschema

    from qwen2.runtime.tool_grammar import tool_call_grammar
    from qwen2.serve.tools import parse_tool_calls

    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def judge(calls, reason, way, question, choice) -> dict:
        ok = bool(calls) and reason in ("tool_calls", None)
        for name, arguments in calls:
            try:
                jsonschema.validate(json.loads(arguments), parameters[name])
            except (json.JSONDecodeError, jsonschema.ValidationError, KeyError):
                ok = False
        return {"way": way, "question": question, "tool_choice": choice, "calls": calls, "finish_reason": reason,
                "ok": ok}

    rows = []
    for question, tool in QUESTIONS[:args.questions]:
        messages = [{"role": "user", "content": question}]
        for choice in (tool, "required"):
            tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": tool}}
            for stream in (False, True):
                _, reason, calls = server_reply(client, model, stream, args.tool_tokens, messages=messages,
                                                tools=TOOLS, tool_choice=tool_choice)
                rows.append(judge(calls, reason, "server stream" if stream else "server", question, choice))
            grammar = tool_call_grammar(m.tokenizer, m.eos_ids, TOOLS, None if choice == "required" else tool)
            text = m.chat(messages, tools=TOOLS, grammar=grammar, max_new_tokens=args.tool_tokens, temperature=0)
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in parse_tool_calls(text, parameters)[1]]
            rows.append(judge(calls, None, "API", question, choice))
    return rows


# ---- speed -----------------------------------------------------------------------------------------

def timed_decode(make_steps) -> float:
    """Seconds from the first token (the prefill's) to the last."""
    first = None
    for _ in make_steps():
        first = first or time.perf_counter()
    return time.perf_counter() - first


def speed_rows(m, args) -> list[dict]:
    from qwen2.runtime.constrained import compile_constraint, constrained_choice, json_schema_spec
    from qwen2.runtime.generate import SamplingParams, decode_steps

    constraint = compile_constraint(json_schema_spec(SPEED_SCHEMA), m.tokenizer, m.eos_ids, m.config.vocab_size)
    params = SamplingParams(max_new_tokens=args.speed_tokens)
    rows = []
    for batch in (1, 8):
        ids = [m.tokenizer.encode(m.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List 64 records about {topic} as JSON following this schema: "
                                         + json.dumps(SPEED_SCHEMA)}], add_generation_prompt=True, tokenize=False))
               for topic in TOPICS[:batch]]
        parsers = []

        def plain():
            return decode_steps(m.decoder, ids, params)

        def constrained():
            parsers[:] = [constraint.start() for _ in ids]
            return decode_steps(m.decoder, ids, params, choose=constrained_choice(parsers))

        timed_decode(plain), timed_decode(constrained)  # warm-up
        quiet = wait_for_quiet(args.wait_quiet)
        watch, times = CpuWatch(), {"plain": [], "constrained": []}
        for _ in range(args.repeats):
            times["plain"].append(timed_decode(plain))
            times["constrained"].append(timed_decode(constrained))
        tok_s = {k: batch * (args.speed_tokens - 1) / statistics.median(v) for k, v in times.items()}
        row = {"engine": "qwen2 int4", "batch": batch, "plain_tok_s": tok_s["plain"],
               "constrained_tok_s": tok_s["constrained"], "ratio": tok_s["constrained"] / tok_s["plain"],
               "rows_still_in_grammar": sum(not p.finished for p in parsers), "times_s": times,
               "others_cpu_pct": round(100 * watch.others_share(), 1), "quiet_before_pct": round(quiet, 1)}
        print(f"  batch {batch}: plain {row['plain_tok_s']:.1f} tok/s, constrained {row['constrained_tok_s']:.1f} "
              f"({row['ratio']:.2f}x)", flush=True)
        rows.append(row)
    rows.append(llama_cpp_row(m, args))
    return rows


def llama_cpp_row(m, args) -> dict:
    """llama.cpp's own constrained / unconstrained decode at batch 1 on the same GGUF and prompt."""
    try:
        import llama_cpp
    except ImportError:
        return {"engine": "llama.cpp", "batch": 1, "status": "not run: llama_cpp is not importable "
                                                             "(pip install llama-cpp-python)"}
    from qwen2.checkpoint.registry import gguf_path

    llm = llama_cpp.Llama(model_path=gguf_path(MODEL, progress=False), n_ctx=2048, n_threads=args.threads,
                          verbose=False)
    prompt = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"List 64 records about {TOPICS[0]} as JSON following this schema: "
                                     + json.dumps(SPEED_SCHEMA)}], add_generation_prompt=True, tokenize=False)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SPEED_SCHEMA), verbose=False)
    no_end = {i: -100.0 for i in m.eos_ids}  # the unconstrained run decodes every step too

    def run(n: int, constrained: bool) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.create_completion(prompt, max_tokens=n, temperature=0, logit_bias=no_end,
                              grammar=grammar if constrained else None)
        return time.perf_counter() - start

    times = {}
    for constrained in (False, True):
        run(8, constrained)  # warm-up
        # decode time = a run of n tokens minus a run of 1 (the prefill and the first token)
        times[constrained] = statistics.median(run(args.speed_tokens, constrained) - run(1, constrained)
                                               for _ in range(args.repeats))
    plain, constrained = ((args.speed_tokens - 1) / times[c] for c in (False, True))
    return {"engine": "llama.cpp", "batch": 1, "plain_tok_s": plain, "constrained_tok_s": constrained,
            "ratio": constrained / plain}


# ---- report ----------------------------------------------------------------------------------------

def summarise(schemas, api, server, streamed) -> dict:
    counts = {}
    for way, replies in (("server", server), ("server stream", streamed)):
        finished = [(text, schema) for (text, reason), schema in zip(replies, schemas) if reason == "stop"]
        verdicts = [verdict(text, schema) for text, schema in finished]
        counts[way] = {"replies": len(replies), "finished": len(finished), "valid": verdicts.count("valid"),
                       "cut_at_limit": sum(reason == "length" for _, reason in replies)}
    api_verdicts = [verdict(text, schema) for text, schema in zip(api, schemas)]
    counts["API"] = {"replies": len(api), "finished": sum(v != "unparsed" for v in api_verdicts),
                     "valid": api_verdicts.count("valid"), "cut_at_limit": api_verdicts.count("unparsed"),
                     "same_text_as_server": sum(a == s for a, (s, _) in zip(api, server)),
                     "unparsed_where_server_finished": sum(v == "unparsed" and reason == "stop" for v, (_, reason)
                                                           in zip(api_verdicts, server))}
    counts["server stream"]["same_text_as_server"] = sum(a == b for (a, _), (b, _) in zip(streamed, server))
    return counts


def markdown(data: dict) -> str:
    a = data["args"]
    lines = [f"Structured output, {MODEL} int4, greedy, {a['threads']} threads; {data['machine']['cpu']}, "
             f"{data['machine']['date']}. Command: `{data['command']}`.", "",
             f"### {a['schemas']} fuzzed JSON schemas (seed {a['seed']}), up to {a['max_new_tokens']} tokens", "",
             "| path | replies | finished | finished that parse and validate | cut at the token limit | "
             "same text as the server |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for way, c in data["schemas"].items():
        pct = f"{c['valid']}/{c['finished']} ({100 * c['valid'] / max(c['finished'], 1):.1f} %)"
        lines.append(f"| {way} | {c['replies']} | {c['finished']} | {pct} | {c['cut_at_limit']} | "
                     f"{c.get('same_text_as_server', '')} |")
    lines += ["", "API rows: a reply that parses is finished; one that does not is counted cut "
                  f"({data['schemas']['API']['unparsed_where_server_finished']} of them where the server finished "
                  "the same prompt).", "", f"### Tool calls ({a['questions']} questions, tool_choice named and "
                  "required, 3 tools)", "", "| path | requests | calls parsed, arguments valid |",
              "| --- | ---: | ---: |"]
    for way in ("API", "server", "server stream"):
        rows = [r for r in data["tool_calls"] if r["way"] == way]
        lines.append(f"| {way} | {len(rows)} | {sum(r['ok'] for r in rows)}/{len(rows)} |")
    lines += ["", f"### Decode speed, {a['speed_tokens']} tokens, median of {a['repeats']}", "",
              "| engine | batch | unconstrained tok/s | JSON-schema constrained tok/s | constrained / unconstrained | "
              "CPU taken by others |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["speed"]:
        if "status" in r:
            lines.append(f"| {r['engine']} | {r['batch']} | {r['status']} | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['batch']} | {r['plain_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | "
                     f"**{r['ratio']:.2f}×** | {r.get('others_cpu_pct', '–')} % |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemas", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tool-tokens", type=int, default=96)
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help="tool-call questions asked (of QUESTIONS)")
    p.add_argument("--batch", type=int, default=8, help="API batch and server concurrency")
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine before timing")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "structured_output.json"))
    return p.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    import openai

    import qwen2
    from qwen2.serve.app import create_app, serve_in_background

    args = parse_args(argv)
    set_torch_threads(args.threads)
    m = qwen2.load(MODEL, quantize="int4", progress=False)
    schemas = fuzzed_schemas(args.schemas, seed=args.seed)
    started = time.perf_counter()
    print(f"{len(schemas)} schemas through the API", flush=True)
    api = api_replies(m, schemas, args)
    with serve_in_background(create_app(m, max_batch=args.batch, max_model_len=2048)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        print("through the server, non-streamed and streamed", flush=True)
        server = server_schema_replies(client, model, schemas, False, args)
        streamed = server_schema_replies(client, model, schemas, True, args)
        print("tool calls", flush=True)
        tools = tool_checks(m, client, model, args)
    validity_s = time.perf_counter() - started
    print("speed", flush=True)
    speed = [] if args.skip_speed else speed_rows(m, args)
    data = {"command": command_line(__spec__.name if __spec__ else "benchmarks.speed.bench_structured_output",
                                    argv), "args": vars(args), "machine": machine_facts(args.threads),
            "validity_s": validity_s, "schemas": summarise(schemas, api, server, streamed), "tool_calls": tools,
            "speed": speed, "replies": [{"schema": s, "api": a, "server": sv, "server_stream": st}
                                        for s, a, sv, st in zip(schemas, api, server, streamed)]}
    md = markdown(data)
    print("\n" + md)
    write_results(args.out, data, md)
    broken = sum(c["finished"] - c["valid"] for c in data["schemas"].values()) + sum(not r["ok"] for r in tools)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
