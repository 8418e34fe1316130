"""Structured output (qwen2/runtime/constrained.py on llguidance; the server's response_format and
forced tool_choice in qwen2/serve/structured.py). A tiny random model with the real 151,936-token
vocabulary and the real tokenizer: left alone it writes garbage, so every reply that parses and
validates is the constraint's doing. The real 0.5B's rates and speed: benchmarks/structured_output.py."""
import json
import re

import jsonschema
import openai
import pytest
import torch

from benchmarks.schema_fuzzer import fuzzed_schemas
from ggufs import random_model, tiny_config
from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.quant import quantize_model
from qwen2.runtime.constrained import compile_constraint, constrained_choice, regex_spec, row_constraints
from qwen2.runtime.generate import SamplingParams, decode_steps
from qwen2.runtime.tool_grammar import tool_call_grammar
from qwen2.serve.app import create_app, serve_in_background
from qwen2.serve.tools import parse_tool_calls

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}, "ok": {"type": "boolean"}},
          "required": ["n", "tag", "ok"], "additionalProperties": False}
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no)", r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}", r"0x[0-9a-f]{2,8}",
           r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"-?[1-9][0-9]{0,3}\.[0-9]{2}"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a", "b"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def parameters_of(name: str) -> dict:
    return next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's ops are too small to share: on a busy machine a second thread only waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(real_gguf):
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    from qwen2.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = tiny_config(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=True)
    return Qwen2(random_model(config, seed=5), tokenizer, source="tiny")


def constrained_tokens(qwen, prompts, max_new_tokens, **requested):
    """Each row's tokens up to its end id, and whether it reached one (else it hit max_new_tokens)."""
    constraints = row_constraints(len(prompts), qwen.tokenizer, qwen.eos_ids, VOCAB, **requested)
    rows = [c.start() for c in constraints]
    out, ended = [[] for _ in prompts], [False] * len(prompts)
    ids = [qwen.tokenizer.encode(p) for p in prompts]
    steps = decode_steps(qwen.decoder, ids, SamplingParams(max_new_tokens=max_new_tokens),
                         choose=constrained_choice(rows))
    for step in steps:
        for row, token in enumerate(step.tolist()):
            if ended[row]:
                continue
            if token in qwen.eos_ids:
                assert rows[row].finished  # an end id only once the grammar is complete
                ended[row] = True
            else:
                out[row].append(token)
        if all(ended):
            break
    return out, ended


# ---- JSON schemas, regexes, grammars ---------------------------------------------------------------

def test_fuzzed_schemas_every_finished_reply_parses_and_validates(tiny):
    """20 seeded schemas (nested objects, bounded arrays, enums, ranges, optional properties, anyOf),
    one row each of one batch. Strings are bounded (8 characters): a random model rarely writes a
    closing quote, so an unbounded string would run to the token limit."""
    schemas = fuzzed_schemas(20, seed=0, max_string_length=8)
    tokens, ended = constrained_tokens(tiny, ["Reply with JSON:"] * len(schemas), 64, json_schema=schemas)
    finished = 0
    for schema, row, done in zip(schemas, tokens, ended):
        text = tiny.tokenizer.decode(row)
        if done:
            jsonschema.validate(json.loads(text), schema)
            finished += 1
        else:  # cut at the limit: a prefix of valid JSON, never a finished one
            assert len(row) == 64 and text.startswith("{")
    print(f"\n{finished}/{len(schemas)} replies finished within 64 tokens")
    assert finished >= 16


def test_regexes_match_every_reply_whole(tiny):
    replies = tiny.generate(["Reply:"] * len(REGEXES), max_new_tokens=40, regex=REGEXES)
    for pattern, reply in zip(REGEXES, replies):
        assert re.fullmatch(pattern, reply), (pattern, reply)
    unconstrained = tiny.generate("Reply:", max_new_tokens=12)
    assert not any(re.fullmatch(p, unconstrained) for p in REGEXES)  # the model alone matches none of them


def test_lark_grammar(tiny):
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,6}/\n'
    for seed in range(3):
        reply = tiny.generate("Say hi:", max_new_tokens=20, grammar=grammar, temperature=1.0, seed=seed)
        assert re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,6}!", reply), reply


def test_batch_rows_each_follow_their_own_constraint_as_alone(tiny):
    prompts = ["Data:", "Phone number:", "Once upon a time"]
    batch = tiny.generate(prompts, max_new_tokens=24, json_schema=[SCHEMA, None, None], regex=[None, REGEXES[0], None])
    assert batch == [tiny.generate(prompts[0], max_new_tokens=24, json_schema=SCHEMA),
                     tiny.generate(prompts[1], max_new_tokens=24, regex=REGEXES[0]),
                     tiny.generate(prompts[2], max_new_tokens=24)]
    jsonschema.validate(json.loads(batch[0]), SCHEMA)
    assert re.fullmatch(REGEXES[0], batch[1])
    # one value for every row of a batch
    for reply in tiny.generate(prompts, max_new_tokens=24, json_schema=json.dumps(SCHEMA)):
        jsonschema.validate(json.loads(reply), SCHEMA)


def test_streaming_equals_non_streaming(tiny):
    for options in ({"json_schema": SCHEMA}, {"regex": REGEXES[2]},
                    {"json_schema": SCHEMA, "temperature": 0.9, "seed": 3}):
        whole = tiny.generate("Go:", max_new_tokens=30, **options)
        assert "".join(tiny.generate("Go:", max_new_tokens=30, stream=True, **options)) == whole
    messages = [{"role": "user", "content": "Give me data."}]
    reply = tiny.chat(messages, max_new_tokens=30, json_schema=SCHEMA)
    jsonschema.validate(json.loads(reply), SCHEMA)
    assert "".join(tiny.chat(messages, max_new_tokens=30, json_schema=SCHEMA, stream=True)) == reply


def test_quantised_model(tokenizer):
    config = tiny_config(vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True)
    int4 = Qwen2(quantize_model(random_model(config, seed=7), "int4", group_size=32), tokenizer, source="tiny-int4")
    schemas = fuzzed_schemas(6, seed=1, max_string_length=6)
    tokens, ended = constrained_tokens(int4, ["JSON:"] * len(schemas), 48, json_schema=schemas)
    assert sum(ended) >= 4
    for schema, row, done in zip(schemas, tokens, ended):
        if done:
            jsonschema.validate(json.loads(tokenizer.decode(row)), schema)
    assert re.fullmatch(REGEXES[4], int4.generate("Email:", max_new_tokens=24, regex=REGEXES[4]))


def test_tool_call_grammar_through_the_api(tiny):
    for name in ("get_weather", "add"):
        reply = tiny.chat(ASK, tools=TOOLS, max_new_tokens=48,
                          grammar=tool_call_grammar(tiny.tokenizer, tiny.eos_ids, TOOLS, name=name))
        content, [call] = parse_tool_calls(reply, {"get_weather", "add"})
        assert content is None and call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters_of(name))
    with pytest.raises(Qwen2Error, match="no tool is named 'nope'; the tools are get_weather, add"):
        tool_call_grammar(tiny.tokenizer, tiny.eos_ids, TOOLS, name="nope")
    with pytest.raises(Qwen2Error, match="tools must be a non-empty list"):
        tool_call_grammar(tiny.tokenizer, tiny.eos_ids, [{"type": "function"}])


# ---- the mask against a brute-force reference -------------------------------------------------------

def test_mask_is_the_tokens_that_keep_a_match_possible(tiny, tokenizer):
    """The first step's allowed tokens for [a-c]{1,2}x are exactly the tokens whose text is a
    non-empty prefix of a match (checked with Python's re over the whole vocabulary); rows of a
    larger embedding (152,064 here) beyond the tokenizer's ids are never allowed; once the text is
    complete only the end ids are."""
    constraint = compile_constraint(regex_spec("[a-c]{1,2}x"), tokenizer, tiny.eos_ids, 152064)
    # compiled once per grammar and tokenizer; each start() a parser of its own
    assert compile_constraint(regex_spec("[a-c]{1,2}x"), tokenizer, tiny.eos_ids, 152064)._matcher is constraint._matcher
    row = constraint.start()
    assert row.matcher is not constraint._matcher
    allowed = set(torch.nonzero(row.mask(torch.zeros(152064)) == 0).flatten().tolist())
    special = {s.id for s in tokenizer.added_tokens}
    expected = {t for t in range(len(tokenizer)) if t not in special
                and re.fullmatch(r"[a-c]{1,2}x?", tokenizer.decode([t]))}
    assert allowed == expected and len(expected) > 10
    for token in tokenizer.encode("abx"):
        row.accept(token)
    assert row.finished
    assert set(torch.nonzero(row.mask(torch.zeros(152064)) == 0).flatten().tolist()) == set(tiny.eos_ids)


# ---- bad input: one line, before any generation -------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"json_schema": {"type": "foo"}}, r"json_schema cannot be used: .*foo"),
    ({"json_schema": '{"type": '}, r"json_schema is not valid JSON"),
    ({"json_schema": 5}, r"json_schema must be a JSON schema object \(a dict\), got int"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 3}},
                      "required": ["a"]}}, r"json_schema cannot be used: .*unsatisfiable"),
    ({"regex": "a("}, r"regex cannot be used: .*unclosed group"),
    ({"regex": "[a&&b]"}, r"regex matches no text at all"),
    ({"grammar": "start: x"}, r"grammar cannot be used: .*unknown name"),
    ({"json_schema": SCHEMA, "regex": "a"}, r"give one of json_schema, regex or grammar, not json_schema and regex"),
    ({"regex": ["a", "b"]}, r"regex has 2 entries for 1 prompt\(s\)"),
    ({"regex": "a", "speculative": "prompt-lookup"}, r"cannot be combined with speculative decoding"),
])
def test_bad_constraints_are_one_line_errors(tiny, no_loading, options, message):
    with pytest.raises(Qwen2Error, match=message) as info:
        tiny.generate("x", max_new_tokens=4, **options)
    assert "\n" not in str(info.value)


def test_cli_flags(tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: tiny)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert cli.main(["generate", "Data:", "--json-schema", str(schema_file), "--max-new-tokens", "30"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert cli.main(["chat", "Phone?", "--regex", REGEXES[0], "--max-new-tokens", "12"]) == 0
    assert re.fullmatch(REGEXES[0], capsys.readouterr().out.strip())
    grammar_file = tmp_path / "yes.lark"
    grammar_file.write_text('start: "yes" | "no"\n')
    assert cli.main(["generate", "Ok?", "--grammar", str(grammar_file)]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    for argv, error in ((["--json-schema", "nope"], "--json-schema 'nope' is neither a file nor JSON"),
                        (["--json-schema", "{oops"], "--json-schema is not valid JSON"),
                        (["--grammar", str(tmp_path / "missing.lark")], "--grammar: cannot read"),
                        (["--regex", "a("], "regex cannot be used")):
        assert cli.main(["generate", "x", *argv]) == 1
        assert capsys.readouterr().err.startswith(f"error: {error}")


# ---- the server: response_format and forced tool calls through the openai client ---------------------



@pytest.fixture(scope="module")
def client(tiny):
    with serve_in_background(create_app(tiny, max_batch=4, max_model_len=1024)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60), url


def test_server_response_format_json_schema(client):
    client, _ = client
    fmt = {"type": "json_schema", "json_schema": {"name": "data", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, response_format=fmt, n=2,
                                       temperature=1.0, seed=1)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert r.choices[0].message.content != r.choices[1].message.content  # each choice its own parser and seed
    whole = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, response_format=fmt)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, response_format=fmt,
                                                  stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
    # /v1/completions takes it too (as vLLM does)
    text = client.completions.create(model="tiny", prompt="Data:", max_tokens=40,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_server_response_format_json_object(client):
    client, _ = client
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=48,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # a random model's keys are long: cut at the limit is a length, never a broken finish
        assert choice.finish_reason == "length" and r.usage.completion_tokens == 48


def call_of(choice):
    [call] = choice.message.tool_calls
    return call.function.name, json.loads(call.function.arguments)


def test_server_tool_choice_named_and_required(client):
    client, _ = client
    for name in ("get_weather", "add"):
        choice = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, max_tokens=64,
            tool_choice={"type": "function", "function": {"name": name}}).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        called, arguments = call_of(choice)
        assert called == name
        jsonschema.validate(arguments, parameters_of(name))
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=96, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), parameters_of(call.function.name))
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=96,
                                                 tool_choice="required", stream=True))
    streamed = [(tc.function.name, json.loads(tc.function.arguments))
                for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed == [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("request_fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "response_format.json_schema.schema cannot be used: .*foo"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "response_format.json_schema.schema is missing"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' or a named function needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names function 'nope', which is not among the request's tools \\(get_weather, add\\)"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "ask for two different replies"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["a"],
                                                                               "properties": {"a": {"type": "bar"}}}}}],
      "tool_choice": "required"}, "tools", "tools cannot be used: .*bar"),
])
def test_server_bad_constraints_are_400s_and_it_keeps_serving(client, request_fields, param, message):
    client, _ = client
    with pytest.raises(openai.BadRequestError, match=message) as info:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **request_fields)
    assert info.value.body["param"] == param and "\n" not in info.value.body["message"]
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices[0].message.content


def test_openapi_schema_documents_structured_output(client):
    import httpx

    _, url = client
    schemas = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
    assert set(schemas["JSONSchemaFormat"]["properties"]) == {"name", "description", "schema", "strict"}
    assert "NamedToolChoice" in schemas and "response_format" in schemas["CompletionRequest"]["properties"]
