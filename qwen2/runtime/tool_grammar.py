"""Qwen2.5's tool-call reply as a grammar: what a forced tool choice constrains decoding to.

The chat template teaches the model to call a tool as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several calls: blocks one line apart; the reply may end with a newline). `tool_call_grammar` is
that reply as a Lark grammar for `generate(grammar=...)` / the server's tool_choice: one block of one named function, or one or more
blocks of any of the tools, each call's "arguments" valid under its function's parameters schema.
"""
from __future__ import annotations

import json
from typing import Sequence

from ..errors import Qwen2Error
from .constrained import JSON_LAYOUT, grammar_token

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_grammar(tokenizer, eos_ids: Sequence[int], tools: Sequence[dict], name: str | None = None) -> str:
    """`tools` in OpenAI's shape ({"type": "function", "function": {"name", "parameters"}}); `name`:
    exactly one call of that function, None: one or more calls of any of them."""
    functions = [tool.get("function") if isinstance(tool, dict) else None for tool in tools]
    if not functions or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise Qwen2Error("tools must be a non-empty list of {'type': 'function', 'function': {'name': ..., "
                         "'parameters': {...}}}")
    names = [f["name"] for f in functions]
    if name is not None and name not in names:
        raise Qwen2Error(f"no tool is named {name!r}; the tools are {', '.join(names)}")
    calls = [call_schema(f["name"], f.get("parameters")) for f in functions if name is None or f["name"] == name]
    schema = dict(calls[0] if len(calls) == 1 else {"anyOf": calls}, **{"x-guidance": JSON_LAYOUT})
    tag_open, tag_close = (grammar_token(tokenizer, eos_ids, tag) for tag in (TOOL_OPEN, TOOL_CLOSE))
    # A newline may end the reply: the model writes one after </tool_call> before its end token, and a
    # newline that had to be followed by another call would make it call every tool in turn.
    start = 'call "\\n"?' if name is not None else 'call ("\\n" call)* "\\n"?'
    return (f"start: {start}\n"
            f'call: {tag_open} "\\n" body "\\n" {tag_close}\n'
            f"body: %json {json.dumps(schema)}\n")


def call_schema(name: str, parameters: dict | None) -> dict:
    """One call: {"name": <this function>, "arguments": <its parameters>} and nothing else."""
    if parameters is not None and not isinstance(parameters, dict):
        raise Qwen2Error(f"tool {name!r}: parameters must be a JSON schema object, got {type(parameters).__name__}")
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}
