"""`qwen2 serve` (qwen2/serve/): a live uvicorn server on loopback, driven by the official `openai`
client and raw HTTP. A tiny random model with the real tokenizer, so real text round-trips and every
answer can be compared with `Qwen2.generate` / `Qwen2.chat` on the same model: continuous batching
must give each request exactly what it gets decoded alone."""
import contextlib
import gc
import json
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest
import torch

from ggufs import random_model, tiny_config
from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.model import StaticKV
from qwen2.runtime.generate import SamplingParams
from qwen2.serve.app import create_app, serve_in_background
from qwen2.serve.engine import Delta, Engine, Finish, QueueFull, Request
from qwen2.serve.protocol import ChatMessage
from qwen2.serve.tools import ToolCallGate, parse_tool_calls, template_messages

CONTEXT = 128


@pytest.fixture(scope="module")
def tokenizer(real_gguf):
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    from qwen2.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = tiny_config(vocab_size=151936, max_position_embeddings=CONTEXT, tie_word_embeddings=True)
    return Qwen2(random_model(config, seed=5), tokenizer, source="tiny")


@contextlib.contextmanager
def live_server(qwen, **options):
    """create_app(qwen, **options) served by uvicorn on 127.0.0.1 at a free port, in a thread."""
    app = create_app(qwen, **options)
    with serve_in_background(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def server(tiny):
    with live_server(tiny, max_batch=4, max_model_len=CONTEXT) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def wait_idle(engine, timeout=10.0) -> None:
    deadline = time.time() + timeout
    while engine.running or engine.queue_depth:
        assert time.time() < deadline, f"{engine.running} sequences still running, {engine.queue_depth} queued"
        time.sleep(0.01)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about rust."}]
PROMPTS = ["def fibonacci(n):", "The capital of France is", "SELECT name FROM users WHERE",
           "Once upon a time, in a land far", "import numpy as np\n", "ünïcödé ✓ 中文 — "]


# ---- the openai client: chat, completion, streaming, stop, seeds, n -------------------------------

def test_models_health_and_page(server, client):
    url, app = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["free_slots"] == 4
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "tokens/s" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing from elsewhere
    assert httpx.get(url + "/docs").status_code == 404  # FastAPI's docs page would load a CDN


def test_chat_equals_the_api(tiny, client):
    expected = tiny.chat(CHAT, max_new_tokens=16)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    prompt = tiny.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 16, len(prompt) + 16)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_completion_and_streams(tiny, client):
    for prompt in PROMPTS[:3]:
        expected = tiny.generate(prompt, max_new_tokens=12)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(tiny.tokenizer.encode(prompt)) and r.usage.completion_tokens == 12
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
    expected = tiny.chat(CHAT, max_new_tokens=20)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices]) > 3  # it streamed, in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_raw_sse_framing(server):
    with httpx.stream("POST", server[0] + "/v1/completions", json={"prompt": "abc", "max_tokens": 5, "stream": True,
                                                                   "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings(tiny, client):
    full = tiny.generate(PROMPTS[0], max_new_tokens=24)
    stop = full[8:11]  # a stop string the greedy continuation is known to reach
    cut = full[:full.find(stop)]
    assert tiny.generate(PROMPTS[0], max_new_tokens=24, stop=[stop]) == cut
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_and_n_choices(tiny, client):
    options = dict(temperature=0.9, max_tokens=8, extra_body={"top_k": 50})
    sampled = dict(temperature=0.9, top_k=50, max_new_tokens=8)
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], seed=11, n=3, **options)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    # choice i samples with seed + i, exactly as Qwen2.generate does with that seed
    assert texts == [tiny.generate(PROMPTS[1], seed=11 + i, **sampled) for i in range(3)]
    assert len(set(texts)) == 3 and r.usage.completion_tokens == 3 * 8
    again = client.completions.create(model="tiny", prompt=PROMPTS[1], seed=11, **options)
    assert again.choices[0].text == texts[0]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, seed=3, n=2, top_p=0.9, **options)
    assert [c.message.content for c in chat.choices] == [tiny.chat(CHAT, seed=3 + i, top_p=0.9, **sampled)
                                                         for i in range(2)]


def test_penalties_change_the_text(tiny, client):
    plain = client.completions.create(model="tiny", prompt="a a a a a a", max_tokens=24, temperature=0)
    penalised = client.completions.create(model="tiny", prompt="a a a a a a", max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != plain.choices[0].text
    tokens = tiny.tokenizer.encode(penalised.choices[0].text)
    assert len(set(tokens)) > len(set(tiny.tokenizer.encode(plain.choices[0].text)))
    with_rep = client.completions.create(model="tiny", prompt="a a a", max_tokens=10, temperature=0,
                                         extra_body={"repetition_penalty": 1.3})
    assert with_rep.choices[0].text == tiny.generate("a a a", max_new_tokens=10, repetition_penalty=1.3)


# ---- continuous batching --------------------------------------------------------------------------

def test_concurrent_streams_equal_each_request_alone(tiny, server, client):
    """Requests of different lengths join the running batch at different times (some while others
    are mid-generation); each one's text equals the same request decoded alone."""
    url, app = server
    engine = app.state.engine
    wait_idle(engine)
    jobs = [(p, 10 + 7 * i) for i, p in enumerate(PROMPTS)]  # 6 requests on 4 slots: two wait, then join
    alone = {p: tiny.generate(p, max_new_tokens=n) for p, n in jobs}
    results, first_token = {}, threading.Event()
    steps, rows = engine.decode_steps, engine.decode_rows

    def run(prompt, n):
        text = ""
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True):
            text += chunk.choices[0].text
            first_token.set()
        results[prompt] = text

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    threads[0].start()
    assert first_token.wait(10)  # the first request is generating before the others arrive
    for t in threads[1:]:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert results == alone
    # ...and they really were decoded together: more than one row per step on average
    assert (engine.decode_rows - rows) / (engine.decode_steps - steps) > 1.5
    wait_idle(engine)
    assert engine.free_slots == engine.max_batch


def test_static_cache_with_a_slot_per_row_equals_each_row_alone(tiny):
    """`StaticKV.slot` of shape (B,): rows at different lengths write their own slot, see their own
    keys (`valid`) at their own RoPE position; each row's logits are its one-row decode's."""
    model = tiny.decoder  # the executor the server runs
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    nxt = torch.tensor([[20], [21], [22]])
    S, L = 12, model.config.num_hidden_layers
    k = torch.zeros(L, 3, model.config.num_key_value_heads, S, model.config.head_dim)
    v = torch.zeros_like(k)
    alone = []
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            cache = model.new_cache(1, len(prompt) + 1)
            model(torch.tensor([prompt]), cache=cache)
            k[:, row, :, :len(prompt)], v[:, row, :, :len(prompt)] = cache.k[:, 0, :, :len(prompt)], cache.v[:, 0, :, :len(prompt)]
            alone.append(model(nxt[row:row + 1], cache=cache)[0, -1])
        lengths = torch.tensor([len(p) for p in prompts])
        valid = torch.arange(S)[None] <= lengths[:, None]
        logits = model(nxt, cache=StaticKV(k.clone(), v.clone(), valid, lengths, lengths))[:, -1]
        exact = model(nxt, cache=StaticKV(k, v, valid, lengths, lengths, exact_rows=True))[:, -1]  # as the server runs
    torch.testing.assert_close(logits, torch.stack(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(exact, torch.stack(alone), rtol=0, atol=1e-5)
    assert all(bool(k[:, row, :, n].abs().sum() > 0) for row, n in enumerate(lengths.tolist()))  # written in place
    assert bool(k[:, 1, :, 3:].abs().sum() == 0)  # and nowhere else


def recorded_request(tiny, prompt: str, max_new_tokens: int, texts: dict, finished: dict) -> Request:
    """A greedy engine Request whose text goes to texts[prompt] and its Finish to finished[prompt]."""
    def emit(events):
        for e in events:
            if isinstance(e, Delta):
                texts[prompt] = texts.get(prompt, "") + e.text
            elif isinstance(e, Finish):
                finished[prompt] = e
    return Request(tiny.tokenizer.encode(prompt), SamplingParams(max_new_tokens=max_new_tokens), emit)


def test_engine_rows_of_different_lengths_join_mid_generation(tiny):
    """The scheduler alone, stepped by hand: a request admitted while another is halfway equals
    generate() on its own, through row moves when an earlier row retires."""
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_ids, max_batch=3, max_model_len=CONTEXT)
    texts, finished = {}, {}
    jobs = {PROMPTS[0]: 30, PROMPTS[1]: 8, PROMPTS[2]: 20, PROMPTS[3]: 25}
    queue = [recorded_request(tiny, p, n, texts, finished) for p, n in jobs.items()]
    with torch.inference_mode():
        engine._step([queue[0]])
        for _ in range(5):
            engine._step([])
        engine._step(queue[1:3])  # join at different lengths
        for _ in range(10):  # PROMPTS[1] (8 tokens) retires in here, the last row moves into its hole
            engine._step([])
        engine._step([queue[3]])
        while engine.rows:
            engine._step([])
    assert texts == {p: tiny.generate(p, max_new_tokens=n) for p, n in jobs.items()}
    assert all(finished[p].completion_tokens == n for p, n in jobs.items())


def test_engine_request_done_at_its_first_token_leaves_before_the_decode_step(tiny):
    """A request finished by its prefill alone (max_tokens 1; or an end token first) joins a running
    batch: it must leave before the step decodes the others, having no token to feed (the fuzzer
    found this as a 503)."""
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_ids, max_batch=2, max_model_len=CONTEXT)
    texts, finished = {}, {}
    jobs = {PROMPTS[0]: 6, PROMPTS[1]: 1}
    running, one_token = [recorded_request(tiny, p, n, texts, finished) for p, n in jobs.items()]
    with torch.inference_mode():
        engine._step([running])
        engine._step([one_token])
        while engine.rows:
            engine._step([])
    assert texts == {p: tiny.generate(p, max_new_tokens=n) for p, n in jobs.items()}
    assert finished[PROMPTS[1]].completion_tokens == 1 and finished[PROMPTS[0]].completion_tokens == 6


# ---- tool calls -----------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}}
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def named_arguments(calls) -> list[tuple]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tool_call_parser():
    names = {"get_weather", "f"}
    content, calls = parse_tool_calls(CALL_TEXT + '\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', names)
    assert content == "Let me check."
    assert named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("f", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("no call here", names) == ("no call here", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken, names) == (broken, [])  # shown as text, never a call that was not made
    assert parse_tool_calls('<tool_call>["x"]</tool_call>', names)[1] == []
    _, unclosed = parse_tool_calls('<tool_call>\n{"name": "g", "arguments": {"a": 1}}', names)  # cut off at the end
    assert json.loads(unclosed[0]["function"]["arguments"]) == {"a": 1}
    gate = ToolCallGate()
    pieces = [gate.push(p) for p in ["Let me", " check.\n<tool", "_call>\n{\"name\"", ": 1}"]]
    assert pieces == ["Let me", " check.\n", "", ""]
    gate = ToolCallGate()
    assert gate.push("a <to") == "a " and gate.push("x") == "<tox"  # a held-back tail that was not a marker


BARE_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
REAL_MODEL_CALL = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'  # greedy, fp32
NOT_CALLS = [
    '{"name": "get_stock", "arguments": {}}',  # no such tool in the request
    '{"name": "get_weather", "arguments": "Paris"}',  # arguments not an object
    '{"name": "get_weather"}', '["get_weather"]', "[]", "{}",
    BARE_CALL[:-1],  # cut off: not JSON
    f"Here you go: {BARE_CALL}", f"{BARE_CALL}\nThat calls the tool.",  # prose around it
    f"```json\n{BARE_CALL}\n```\n```json\n{BARE_CALL}\n```",  # two fences
    f"```python\n{BARE_CALL}\n```",
    f'[{BARE_CALL}, {{"name": "rm", "arguments": {{}}}}]',  # one of them is no declared tool
    "[1, 2] is a list, {} a dict",
]


def test_bare_json_tool_calls():
    """Qwen2.5-Coder-0.5B leaves out the <tool_call> tags: a reply that is nothing but a call (or a
    list of calls) of the request's tools, as bare JSON, perhaps in one fence, is a call; JSON that
    only looks like one stays the text."""
    names = {"get_weather", "get_time"}
    for text in (BARE_CALL, f"\n {BARE_CALL}\n", REAL_MODEL_CALL, f"```\n{BARE_CALL}\n```",
                 '{"name": "get_weather", "parameters": {"city": "Paris"}}'):
        content, calls = parse_tool_calls(text, names)
        assert content is None and named_arguments(calls) == [("get_weather", {"city": "Paris"})], text
        assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    calls = parse_tool_calls(f'[{BARE_CALL}, {{"name": "get_time", "arguments": {{}}}}]', names)[1]
    assert named_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for text in NOT_CALLS:
        assert parse_tool_calls(text, names) == (text, []), text
    assert parse_tool_calls(BARE_CALL, set()) == (BARE_CALL, [])  # no tools declared


def test_tool_call_gate_holds_back_what_may_be_a_bare_call():
    def pushed(pieces):
        gate = ToolCallGate()
        return [gate.push(piece) for piece in pieces]

    assert pushed(["\n", "```", "json\n{", '"name"', "}\n```"]) == [""] * 5  # held to the end: the caller
    assert pushed([" {", '"a": 1}', " and more"]) == [""] * 3  # decides, and sends it if it is no call
    assert pushed(["[1, 2]", " is a list"]) == ["", ""]
    assert pushed(["`", "`", "x is code"]) == ["", "", "``x is code"]  # not a fence after all
    assert pushed(["  ", "Sure", "! {x}"]) == ["", "  Sure", "! {x}"]
    assert pushed(['{"a": 1}\n<tool', "_call>\n{}"]) == ["", '{"a": 1}\n']  # a tagged call: what came before is content


def test_tool_messages_go_through_the_template(tiny):
    messages = [ChatMessage(role="user", content="Weather in Paris?"),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
                ChatMessage(role="tool", tool_call_id="call_1", content='{"celsius": 21}')]
    text = tiny.tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True,
                                              tools=[WEATHER_TOOL])
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tool list, in the system prompt
    # the call's arguments rendered as a JSON object (not a quoted string), the result as a tool_response
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


class ScriptedEngine(Engine):
    """Writes `script` whatever the logits say: the tiny random model never calls a tool by itself."""
    script: list[int] = []

    def _choose(self, seq, logits):
        return self.script[seq.generated] if seq.generated < len(self.script) else self.eos_ids[0]


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """(model, ScriptedEngine, client) of a live server; a test sets `engine.script`. A longer
    context than `tiny`'s: the tool list alone takes ~200 tokens of system prompt."""
    config = tiny_config(vocab_size=151936, max_position_embeddings=1024, tie_word_embeddings=True)
    tiny = Qwen2(random_model(config, seed=6), tokenizer, source="tiny")
    engine = ScriptedEngine(tiny.model, tiny.tokenizer, tiny.eos_ids, max_batch=2, max_model_len=1024)
    with live_server(tiny, engine=engine) as (url, app):
        yield tiny, engine, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_reply(client, **request) -> tuple[str, list[tuple], str]:
    """(content, [(name, arguments)], last finish_reason) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, **request))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [(tc.function.name, json.loads(tc.function.arguments))
             for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    return content, calls, chunks[-1].choices[0].finish_reason


def test_tool_call_round_trip(scripted):
    tiny, engine, client = scripted
    engine.script = tiny.tokenizer.encode(CALL_TEXT)
    messages = WEATHER_QUESTION
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=[WEATHER_TOOL],
                                                tokenize=True)
    assert r.usage.prompt_tokens == len(prompt)  # the tools were rendered into the prompt
    # streamed: the text before the call as content, then the call, then finish_reason tool_calls
    content, calls, finish_reason = streamed_reply(client, model="tiny", messages=messages, tools=[WEATHER_TOOL],
                                                   max_tokens=64)
    assert content == "Let me check.\n" and "<tool_call>" not in content
    assert calls == [("get_weather", {"city": "Paris"})] and finish_reason == "tool_calls"
    # without tools the same text is plain content
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=64)
    assert plain.choices[0].message.content == CALL_TEXT and plain.choices[0].finish_reason == "stop"
    # the call and its result go back: the assistant's tool_calls and a role "tool" message
    followup = messages + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    r2 = client.chat.completions.create(model="tiny", messages=followup, tools=[WEATHER_TOOL], max_tokens=64)
    expected = tiny.tokenizer.apply_chat_template(
        template_messages([ChatMessage(**m) for m in followup]), add_generation_prompt=True, tools=[WEATHER_TOOL])
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in expected
    assert r2.usage.prompt_tokens == len(tiny.tokenizer.encode(expected))


def test_bare_json_tool_calls_through_the_server(scripted):
    """Streamed or not, a bare call comes back as tool_calls, and JSON that is no call as the same
    text: the deltas the gate held back are sent at the end."""
    tiny, engine, client = scripted
    request = dict(model="tiny", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], max_tokens=64)
    for text in (REAL_MODEL_CALL, BARE_CALL):
        engine.script = tiny.tokenizer.encode(text)
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
            [("get_weather", {"city": "Paris"})]
        assert streamed_reply(client, **request) == ("", [("get_weather", {"city": "Paris"})], "tool_calls")
    for text in NOT_CALLS[:3] + NOT_CALLS[-3:] + ["  Sure: `x`"]:
        engine.script = tiny.tokenizer.encode(text)
        choice = client.chat.completions.create(**request).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")
        assert streamed_reply(client, **request) == (text, [], "stop")


@pytest.mark.real_model
def test_real_model_tool_call(real_model):
    """The shipped 0.5B, greedy, answers with the call in a ```json fence and no <tool_call> tags
    (REAL_MODEL_CALL): it must come back as tool_calls, streamed or not."""
    with live_server(real_model, max_batch=1, max_model_len=512) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        request = dict(model=app.state.model_name, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], max_tokens=64,
                       temperature=0)
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
        content, calls, finish_reason = streamed_reply(client, **request)
        assert (content, finish_reason) == ("", "tool_calls")
        assert [name for name, _ in calls] == ["get_weather"] and "Paris" in calls[0][1]["city"]


# ---- errors: OpenAI's JSON, the client's typed exceptions ----------------------------------------

def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


def test_errors_raise_the_clients_typed_exceptions(tiny, server, client):
    url, _ = server
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist; this server serves 'tiny'"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    long_prompt = "word " * 200
    with pytest.raises(openai.BadRequestError, match=r"prompt \(\d+ tokens\) leaves no room in the context of 128"):
        client.completions.create(model="tiny", prompt=long_prompt)
    with pytest.raises(openai.BadRequestError, match=r"prompt \(4 tokens\) \+ max_tokens \(200\) exceeds the "
                                                     r"context of 128 tokens; shorten the prompt or lower max_tokens"):
        client.completions.create(model="tiny", prompt="def f(x):", max_tokens=200)
    with pytest.raises(openai.BadRequestError, match=r"n \(5\) exceeds the server's batch of 4"):
        client.completions.create(model="tiny", prompt="x", n=5, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs are not supported"):
        client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=CHAT, temperature="hot")
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="content part of type 'image_url' is not supported"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    with pytest.raises(openai.BadRequestError, match="prompt token ids must be below the vocabulary size"):
        client.completions.create(model="tiny", prompt=[1, 2, 10 ** 7], max_tokens=2)

    assert error_of(httpx.post(url + "/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={"messages": "hi"}), 422)["param"] == "messages"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -1}), 422)["param"] == "max_tokens"
    assert error_of(httpx.post(url + "/v1/completions", json=[1, 2]), 422)
    assert error_of(httpx.post(url + "/v1/completions"), 422)
    assert error_of(httpx.get(url + "/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(httpx.get(url + "/v1/completions"), 405)["code"] == "method_not_allowed"
    assert error_of(httpx.post(url + "/v1/completions", content=b"x" * ((1 << 20) + 1)), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit counts the bytes as they come
        for _ in range(40):
            yield b" " * 65536
    assert error_of(httpx.post(url + "/v1/completions", content=chunked()), 413)


def post_json(url: str, body) -> httpx.Response:
    """POST `body` as ASCII JSON: a lone surrogate travels as its \\u escape (httpx's json= would
    fail to encode it as UTF-8 before sending)."""
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


HI = [{"role": "user", "content": "hi"}]
FUNCTION = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "system", "content": "\udfff terse"}] + HI}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text"),
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "stream": True}, "messages.0.content"),
    ("chat/completions", {"messages": HI, "stop": ["ok", "\ud800"]}, "stop.1"),
    ("chat/completions", {"messages": HI, "tools": [{"type": "function", "function": dict(FUNCTION, description="\ud800")}]},
     "tools.0.function.description"),
    ("chat/completions", {"messages": HI, "stream": True,
              "tools": [{"type": "function", "function": dict(FUNCTION, parameters={"properties": {"\udc80": {}}})}]},
     "tools.0.function.parameters.properties"),
    ("completions", {"prompt": "\ud800"}, "prompt"),
    ("completions", {"prompt": ["ok", "x\udbff"]}, "prompt.1"),
    ("completions", {"prompt": "\ud800", "stream": True}, "prompt"),
    ("completions", {"prompt": "ok", "stop": "\ud800"}, "stop"),
])
def test_invalid_unicode_is_a_400_naming_the_field(server, endpoint, body, param):
    """JSON can carry a lone surrogate ("\\ud800"), Python keeps it, UTF-8 cannot encode it: a 400
    that says which text and how to fix it, never a 500, also for a stop string (never encoded)."""
    error = error_of(post_json(f"{server[0]}/v1/{endpoint}", dict(body, max_tokens=2)), 400)
    assert error["param"] == param and error["code"] == "invalid_unicode"
    assert f"{param}: the text is not valid Unicode" in error["message"]
    assert "is a lone surrogate (U+D" in error["message"] and "send UTF-8 text" in error["message"]


def test_response_format_text_is_plain_text(server, client):
    """json_object and json_schema (structured output): tests/test_structured_output.py."""
    url, _ = server
    for response_format in (None, {"type": "text"}):
        assert post_json(url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                                        "response_format": response_format}).status_code == 200
    schema = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
    assert "response_format" in schema["ChatCompletionRequest"]["properties"]


@pytest.mark.parametrize("messages, position", [
    ([{"role": "user", "content": None}], 0),
    ([{"role": "system", "content": "terse"}, {"role": "user"}], 1),
    (HI + [{"role": "assistant", "content": None}] + HI, 1),
    (HI + [{"role": "tool", "tool_call_id": "call_1", "content": None}], 1),
])
def test_null_content_is_a_400_naming_the_message(server, messages, position):
    error = error_of(post_json(server[0] + "/v1/chat/completions", {"messages": messages, "max_tokens": 2}), 400)
    assert error["message"].startswith(f"messages[{position}]: content is missing or null; it may be null only for "
                                       "an assistant message that has tool_calls")
    assert error["param"] == f"messages.{position}.content" and "template" not in error["message"]


@pytest.mark.parametrize("endpoint, body, param, message", [
    ("completions", {"prompt": "x", "stop": ["s"] * 17}, "stop", "List should have at most 16 items"),
    ("completions", {"prompt": "x", "stop": ["s", 1]}, "stop.1", "Input should be a valid string"),
    ("completions", {"prompt": ["x"] * 65}, "prompt", "List should have at most 64 items"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text", "Input should be a valid string"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
])
def test_union_field_errors_name_the_branch_that_fits(server, endpoint, body, param, message):
    """A union-typed field (stop: str | list[str]) fails once per branch; the error reported is the
    one of the branch the input's type fits, at the client's path (no `list[str]` branch tag)."""
    error = error_of(post_json(f"{server[0]}/v1/{endpoint}", body), 422)
    assert error["param"] == param and error["message"].startswith(f"{param}: {message}")


def test_api_key(tiny, monkeypatch):
    with live_server(tiny, api_key="s3cret", max_batch=1, max_model_len=64) as (url, app):
        for key in ("wrong", "s3cret-and-more", "s3cre"):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
                client.models.list()
        assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
        assert error_of(httpx.get(url + "/metrics"), 401)
        assert error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0).choices[0].text == \
            tiny.generate("hi", max_new_tokens=3)
        # an unauthenticated body is never parsed: 401 before 400 or 413
        assert httpx.post(url + "/v1/completions", content=b"{bad").status_code == 401
        assert httpx.post(url + "/v1/completions", content=b"x" * (2 << 20)).status_code == 401


class SlowEngine(Engine):
    def _choose(self, seq, logits):
        # the running request holds its slot for ~30 s (120 tokens), not milliseconds: long enough for
        # the queued request to arrive even on a loaded machine; closing its stream cancels it early
        time.sleep(0.25)
        return super()._choose(seq, logits)


def test_full_queue_answers_429_with_retry_after(tiny):
    engine = SlowEngine(tiny.model, tiny.tokenizer, tiny.eos_ids, max_batch=1, max_queue=1, max_model_len=CONTEXT)
    with live_server(tiny, engine=engine) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        engine = app.state.engine
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": "a", "max_tokens": 120, "stream": True}) as running:
            next(running.iter_lines())  # it holds the one slot
            queued = threading.Thread(target=client.completions.create,
                                      kwargs=dict(model="tiny", prompt="b", max_tokens=2))
            queued.start()
            deadline = time.time() + 10
            while engine.queue_depth < 1:
                assert time.time() < deadline
                time.sleep(0.005)
            with pytest.raises(openai.RateLimitError, match="the server is busy") as info:
                client.completions.create(model="tiny", prompt="c", max_tokens=2)
            assert info.value.response.headers["retry-after"] == "1"
        queued.join(30)
        wait_idle(engine)
    idle = Engine(tiny.model, tiny.tokenizer, tiny.eos_ids, max_batch=1, max_queue=2)  # not started: nothing leaves
    for _ in range(2):
        idle.submit(Request([1], SamplingParams(max_new_tokens=1), lambda events: None))
    with pytest.raises(QueueFull):
        idle.submit(Request([1], SamplingParams(max_new_tokens=1), lambda events: None))


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, name
    return values[0]


def test_metrics(server, client):
    url, _ = server
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    assert 'qwen2_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("qwen2_generation_tokens_total", "qwen2_prompt_tokens_total", "qwen2_queue_depth 0",
                 "qwen2_running_sequences", "qwen2_free_slots", "qwen2_time_to_first_token_seconds_bucket{le=\"+Inf\"}",
                 "qwen2_request_duration_seconds_count"):
        assert name in text, name
    before = {name: metric(text, name) for name in ("qwen2_generation_tokens_total", "qwen2_prompt_tokens_total",
                                                   "qwen2_request_duration_seconds_count")}
    client.completions.create(model="tiny", prompt="metrics", max_tokens=5, temperature=0)
    text = httpx.get(url + "/metrics").text
    assert metric(text, "qwen2_generation_tokens_total") == before["qwen2_generation_tokens_total"] + 5
    assert metric(text, "qwen2_prompt_tokens_total") == before["qwen2_prompt_tokens_total"] + 1  # "metrics" is one token
    assert metric(text, "qwen2_request_duration_seconds_count") == before["qwen2_request_duration_seconds_count"] + 1


# ---- disconnects free their slots -----------------------------------------------------------------

def test_aborted_streams_free_their_slots_and_memory(tiny, server, client):
    url, app = server
    engine = app.state.engine
    process = psutil.Process()

    def abort_streams(count):
        with httpx.Client(timeout=30) as http:
            for i in range(count):
                with http.stream("POST", url + "/v1/completions",
                                 json={"prompt": f"count to {i}:", "max_tokens": 100, "stream": True,
                                       "temperature": 0}) as r:
                    assert next(r.iter_lines()).startswith('data: {"id"')  # text came: the sequence is running
                # leaving the block closes the connection mid-stream

    abort_streams(10)  # warm up allocator and caches before the baseline
    wait_idle(engine)
    gc.collect()
    baseline = process.memory_info().rss
    generated = engine.generated_tokens
    abort_streams(100)
    wait_idle(engine)  # every aborted sequence has left the batch...
    assert engine.free_slots == engine.max_batch and engine.queue_depth == 0
    assert engine.generated_tokens - generated < 100 * 100 / 4  # ...cut short, not run to max_tokens
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == tiny.chat(CHAT, max_new_tokens=8)
    gc.collect()
    assert abs(process.memory_info().rss - baseline) <= 0.05 * baseline


# ---- fuzzing the OpenAPI schema -------------------------------------------------------------------

def test_fuzz_the_openapi_schema(tiny):
    """schemathesis generates requests from /openapi.json (valid and not): never a 500, never a hang."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    with live_server(tiny, max_batch=4, max_model_len=24) as (url, app):
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        statuses = []
        for operation in operations:
            @settings(max_examples=40 if operation.method.upper() == "POST" else 5, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case):
                response = case.call(base_url=url, timeout=10)
                statuses.append(response.status_code)
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
        wait_idle(app.state.engine)
        assert app.state.engine.free_slots == 4
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)


# ---- the command line -----------------------------------------------------------------------------

def test_cli_serve(monkeypatch, tmp_path, tiny, capsys):
    import uvicorn as uv

    seen = {}
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: tiny)
    monkeypatch.setattr(uv.Server, "run", lambda server, sockets: seen.update(app=server.config.app,
                                                                               address=sockets[0].getsockname()))
    monkeypatch.setenv("QWEN2_API_KEY", "from-env")
    assert cli.main(["serve", "--port", "0", "--max-batch", "2", "--max-model-len", "64"]) == 0
    host, port = seen["address"]  # uvicorn serves on the socket bound before loading
    assert host == "127.0.0.1" and port > 0  # loopback unless told otherwise
    engine = seen["app"].state.engine
    assert (engine.max_batch, engine.max_model_len) == (2, 64)
    err = capsys.readouterr().err
    assert f"serving tiny on http://127.0.0.1:{port} " in err and "API key required" in err  # the port it has
    assert cli.main(["serve", "--port", "0", "--max-model-len", "100000"]) == 1
    assert capsys.readouterr().err.startswith("error: max_model_len must be between 2 and the model's context length")


def test_cli_serve_bad_port_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: pytest.fail("the model was loaded"))
    for port in ("99999", "-1"):
        assert cli.main(["serve", "--port", port]) == 1
        assert capsys.readouterr().err == \
            f"error: port {port} is out of range; pass a port from 0 to 65535 (0 = any free port)\n"


def test_cli_serve_port_in_use_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1 port {port}: Address already in use; pick another --port")
    assert err.count("\n") == 1
