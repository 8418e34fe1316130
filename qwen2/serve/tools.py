"""Tool calling in Qwen2.5's format, both ways.

In: `tools` and the conversation (assistant `tool_calls`, `role: tool` results) go through the model's
own chat template, which renders the tool list into the system prompt and the results as
<tool_response> blocks. OpenAI sends a call's arguments as a JSON string; the template writes them
with `tojson`, so they are parsed back to an object first (else they would be quoted twice).

Out: the model answers a call as
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
(one block per call); `parse_tool_calls` turns that into OpenAI `tool_calls`, and `ToolCallGate`
streams the text before the first block as content and holds back the rest. Small models (the shipped
Qwen2.5-Coder-0.5B) leave the tags out and answer with the bare object, often in a ```json fence;
such a reply is a call too when it is nothing but calls of the request's own tools.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection

from ..runtime.tool_grammar import TOOL_CLOSE, TOOL_OPEN
from .protocol import APIError, ChatMessage
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|$)", re.S)
FENCE = "```"
_FENCED = re.compile(r"```(?:json)?(.*)```", re.S | re.I)
BARE_OPENERS = ("{", "[", FENCE)  # how a reply that is a bare call begins (after whitespace)


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply to a request declaring the tool functions `names`.
    Content is the text before the first <tool_call> (None when empty). A block that is not a JSON
    object with a string "name" makes the whole reply plain content: better the user sees what the
    model wrote than a call that was never made. Without any block, a reply that is only a call (or
    a list of calls) as bare JSON is taken as calls; see `_bare_calls`."""
    at = text.find(TOOL_OPEN)
    if at < 0:
        calls = _bare_calls(text, names)
        return (None, calls) if calls else (text, [])
    calls = []
    for block in _BLOCK.finditer(text, at):
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append(_openai_call(call["name"], _call_arguments(call, {})))
    content = text[:at].strip()
    return content or None, calls


def _bare_calls(text: str, names: Collection[str]) -> list[dict]:
    """The calls of a reply that is, whole (in at most one ``` or ```json fence), a JSON object or a
    list of objects, each with a declared tool's "name" and an object of "arguments" (or
    "parameters"); else []. Stricter than the tagged form: without the tags, JSON that only looks
    like a call (a code answer, a name no tool has) must stay the text the user asked for."""
    body = text.strip()
    fenced = _FENCED.fullmatch(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError:
        return []
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"] in names
                            and isinstance(_call_arguments(call), dict) for call in calls):
        return []
    return [_openai_call(call["name"], _call_arguments(call)) for call in calls]


def _call_arguments(call: dict, default=None):
    return call.get("arguments", call.get("parameters", default))  # some models say "parameters"


def _openai_call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallGate:
    """Streams content up to the first <tool_call>; from there on holds everything back (the calls
    are parsed when the reply is complete). Also holds back a tail that may be the marker's start,
    and the whole of a reply that opens like a bare call ({, [ or a ``` fence, after whitespace):
    only the finished reply tells a call from JSON or code meant as text. What is held and turns out
    not to be a call is sent by the caller at the end, so the pieces always add up to the reply."""

    def __init__(self):
        self.pending = ""
        self.closed = False  # a call has begun
        self.opening = True  # nothing sent yet: the reply may still be a bare call

    def push(self, piece: str) -> str:
        if self.closed:
            return ""
        self.pending += piece
        at = self.pending.find(TOOL_OPEN)
        if at >= 0:
            self.closed = True
            return self.pending[:at]
        if self.opening:
            head = self.pending.lstrip()
            if head.startswith(BARE_OPENERS) or FENCE.startswith(head):  # "" and "`" may still become one
                return ""
            self.opening = False
        keep = next((k for k in range(min(len(TOOL_OPEN) - 1, len(self.pending)), 0, -1)
                     if TOOL_OPEN.startswith(self.pending[-k:])), 0)
        ready, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return ready


def message_text(message: ChatMessage, position: int) -> str | None:
    """A message's content as one string: text parts joined (the model reads text only). Only an
    assistant message that makes tool calls may have none: the chat template reads every other
    message's content, and would fail on a missing one with an error about its own internals."""
    if message.content is None:
        if message.role == "assistant" and message.tool_calls:
            return None
        raise APIError(400, f"messages[{position}]: content is missing or null; it may be null only for an assistant "
                            f"message that has tool_calls, so send this {message.role} message's text",
                       param=f"messages.{position}.content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{position}]: content part of type {part.type!r} is not supported; "
                                "this model reads text parts ({'type': 'text', 'text': ...}) only",
                           param=f"messages.{position}.content")
        texts.append(part.text)
    return "".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the dicts the chat template reads."""
    out = []
    for position, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role  # "developer" is OpenAI's new "system"
        entry = {"role": role, "content": message_text(message, position)}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            entry["tool_calls"] = [{"id": call.id, "type": "function",
                                    "function": {"name": call.function.name,
                                                 "arguments": _arguments(call.function.arguments)}}
                                   for call in message.tool_calls]
        out.append(entry)
    return out


def _arguments(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # the template writes it as a string; the model sees what the client sent
