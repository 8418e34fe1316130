"""The OpenAI API's request bodies (the fields this server honours) as pydantic models, and its error
shape `{"error": {"message", "type", "param", "code"}}`.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields a server may not
know); fields whose meaning we cannot honour (logprobs, echo, best_of) are refused with 400
rather than silently dropped. The OpenAPI schema FastAPI
derives from these models is what the fuzzing test generates requests from.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2 ** 63), le=2 ** 63 - 1)


class APIError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields both /v1/completions and /v1/chat/completions take."""
    model: str | None = Field(None, description="the served model's id, or the name of a LoRA adapter served over "
                              "it (`qwen2 serve --lora NAME=DIR`) to generate with that adapter; both are listed by "
                              "GET /v1/models; optional (the base model); an unknown name is a 404")
    max_tokens: int | None = Field(None, ge=1, le=2 ** 31, description="default: the rest of the context")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default: the model's "
                                                                    "generation_config (greedy for registry models)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2 ** 31, description="extension (as vLLM): 0 = off")
    min_p: float | None = Field(None, ge=0, lt=1, description="extension (as vLLM): 0 = off")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension (as vLLM): 1 = off")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=128)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = Field(None, **INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="the arguments as a JSON string, as OpenAI sends them")


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(description="a name for the schema (OpenAI requires one; not used otherwise)")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema every reply follows (required)")
    strict: bool | None = Field(None, description="accepted for OpenAI compatibility: replies always follow the schema")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: free text (the default); json_object: any JSON object; json_schema: JSON valid under "
                    "json_schema.schema. Decoding is constrained token by token (llguidance), so a finished reply "
                    "always parses and validates; one cut at max_tokens (finish_reason 'length') may not")
    json_schema: JSONSchemaFormat | None = None


class ToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2 ** 31, description="newer name of max_tokens")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools): the model decides; none: no tools in the prompt; required: "
                          "the reply is one or more calls of the tools; {'type': 'function', 'function': {'name': "
                          "...}}: one call of that function. The forced forms constrain decoding to Qwen2.5's "
                          "<tool_call> blocks with the arguments valid under the function's parameters schema")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = Field(None, description="structured output: {'type': 'json_object'} or "
                                                   "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': "
                                                   "{...}}}; a schema that cannot be used is a 400")


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)] \
        | Annotated[list[Annotated[int, Field(ge=0, le=2 ** 31)]], Field(min_length=1)]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = Field(None, description="extension (as vLLM): structured output, as in "
                                                   "/v1/chat/completions")
    suffix: str | None = Field(None, description="fill in the middle: the text after the completion, whose prompt "
                               "is then the text before it (as text, not token ids). Uses the model's FIM tokens "
                               "(Qwen2.5-Coder: <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>) and stops at its FIM "
                               "end tokens; 400 for a model without them")
