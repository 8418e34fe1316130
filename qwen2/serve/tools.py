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
streams the text before the first block as content and holds back the rest.
"""
from __future__ import annotations

import json
import re
import uuid

from .protocol import APIError, ChatMessage

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|$)", re.S)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply. Content is the text before the first call (None
    when empty). A block that is not a JSON object with a string "name" makes the whole reply plain
    content: better the user sees what the model wrote than a call that was never made."""
    at = text.find(TOOL_OPEN)
    if at < 0:
        return text, []
    calls = []
    for block in _BLOCK.finditer(text, at):
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    content = text[:at].strip()
    return content or None, calls


class ToolCallGate:
    """Streams content up to the first <tool_call>; from there on holds everything back (the calls
    are parsed when the reply is complete). Also holds back a tail that may be the marker's start."""

    def __init__(self):
        self.pending = ""
        self.closed = False  # a call has begun

    def push(self, piece: str) -> str:
        if self.closed:
            return ""
        self.pending += piece
        at = self.pending.find(TOOL_OPEN)
        if at >= 0:
            self.closed = True
            return self.pending[:at]
        keep = next((k for k in range(min(len(TOOL_OPEN) - 1, len(self.pending)), 0, -1)
                     if TOOL_OPEN.startswith(self.pending[-k:])), 0)
        ready, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return ready


def message_text(message: ChatMessage, position: int) -> str | None:
    """A message's content as one string: text parts joined (the model reads text only)."""
    if message.content is None or isinstance(message.content, str):
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
