"""A request's output constraint in the OpenAI API, compiled by `qwen2.runtime.constrained`:

  response_format {"type": "json_object"}                      any JSON object
  response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                                                               JSON valid under the schema
  tool_choice "required" / {"type": "function", "function": {"name": ...}}
                                                               Qwen2.5's <tool_call> blocks, one or more
                                                               of any tool / one of that function, the
                                                               arguments valid under its parameters
                                                               (`qwen2.runtime.tool_grammar`)

`qwen2.serve.tools.parse_tool_calls` turns the blocks back into OpenAI `tool_calls`. Every problem
is a 400 naming the field, raised before anything is queued.
"""
from __future__ import annotations

from ..errors import Qwen2Error
from ..runtime.constrained import ANY_JSON_OBJECT, Constraint, GrammarSpec, compile_constraint, json_schema_spec, \
    lark_spec
from ..runtime.tool_grammar import tool_call_grammar
from .protocol import APIError, NamedToolChoice

SCHEMA_PARAM = "response_format.json_schema.schema"


def forces_tool_call(tool_choice) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)


def request_constraint(body, qwen) -> Constraint | None:
    """The constraint `body` (a chat or completion request) asks for, compiled for `qwen`; None if none."""
    response_format = body.response_format
    tool_choice = getattr(body, "tool_choice", None)  # chat only
    structured = response_format is not None and response_format.type != "text"
    if structured and forces_tool_call(tool_choice):
        raise APIError(400, "response_format json_object/json_schema and a forced tool_choice ('required' or a named "
                            "function) ask for two different replies; send one of them", param="response_format")
    if not structured and not forces_tool_call(tool_choice):
        return None
    param = SCHEMA_PARAM if structured and response_format.type == "json_schema" else \
        "response_format" if structured else "tools"
    try:
        spec = _response_format_spec(response_format) if structured else _tool_call_spec(body.tools, tool_choice, qwen)
        return compile_constraint(spec, qwen.tokenizer, qwen.eos_ids, qwen.config.vocab_size)
    except Qwen2Error as e:
        raise APIError(400, str(e), param=param, code="invalid_constraint") from None


def _response_format_spec(response_format) -> GrammarSpec:
    if response_format.type == "json_object":
        return json_schema_spec(ANY_JSON_OBJECT, what="response_format")
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise APIError(400, f"{SCHEMA_PARAM} is missing: response_format json_schema takes "
                            "{'json_schema': {'name': ..., 'schema': {...}}}", param=SCHEMA_PARAM)
    return json_schema_spec(response_format.json_schema.schema_, what=SCHEMA_PARAM)


def _tool_call_spec(tools, tool_choice, qwen) -> GrammarSpec:
    if not tools:
        raise APIError(400, "tool_choice 'required' or a named function needs tools; send the tools the reply must "
                            "call", param="tool_choice")
    names = [t.function.name for t in tools]
    named = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names function {named!r}, which is not among the request's tools "
                            f"({', '.join(names)})", param="tool_choice")
    grammar = tool_call_grammar(qwen.tokenizer, qwen.eos_ids, [t.model_dump(exclude_none=True) for t in tools], named)
    return lark_spec(grammar, what="tools")
