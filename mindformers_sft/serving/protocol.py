"""OpenAI request bodies (pydantic) and OpenAI's error JSON.

Only what a text model can honour is accepted: n = 1, no logprobs, no tools; unknown extra fields are ignored,
as OpenAI-compatible servers do. Every refusal is an `APIError` with OpenAI's shape:
    {"error": {"message": ..., "type": "invalid_request_error", "param": "messages", "code": ...}}
"""
from __future__ import annotations

from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ContentPart(BaseModel):
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, List[ContentPart], None] = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise APIError(400, f"messages[{index}].content: expected a string", f"messages.[{index}].content")
        parts = []
        for j, p in enumerate(self.content):
            if p.type != "text" or p.text is None:
                raise APIError(400, f"messages[{index}].content[{j}]: only text parts are supported, got type "
                                    f"'{p.type}'", f"messages.[{index}].content")
            parts.append(p.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)            # -1 or 0: off (vLLM's -1 accepted)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None
    ignore_eos: bool = False                # vLLM's extension: always generate max_tokens

    def stop_list(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: empty strings are not allowed", "stop")
        return stops

    def check_unsupported(self):
        if self.logprobs:
            raise APIError(400, "logprobs: not supported by this server", "logprobs")


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list] = None

    def check_unsupported(self):
        super().check_unsupported()
        if self.tools:
            raise APIError(400, "tools: not supported by this server", "tools")

    def conversation(self):
        """(system or None, [(role, text), ...]) after checking roles: an optional system (or developer) message
        first, then user and assistant alternating, starting and ending with user."""
        msgs = list(self.messages)
        system = None
        if msgs[0].role in ("system", "developer"):
            system = msgs[0].text(0)
            msgs = msgs[1:]
            offset = 1
        else:
            offset = 0
        turns = []
        for i, m in enumerate(msgs):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                known = m.role in ("system", "developer", "user", "assistant")
                why = (f"unknown role '{m.role}' (expected system, user or assistant)" if not known else
                       f"role '{m.role}' here; expected '{expected}' (an optional system message first, then user "
                       "and assistant alternating, starting with user)")
                raise APIError(400, f"messages[{i + offset}]: {why}", f"messages.[{i + offset}].role")
            turns.append((m.role, m.text(i + offset)))
        if not turns or turns[-1][0] != "user":
            raise APIError(400, "messages: the last message must be a user message (the model answers it)",
                           "messages")
        return system, turns


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=1)
    suffix: Optional[str] = None

    def check_unsupported(self):
        super().check_unsupported()
        if self.echo:
            raise APIError(400, "echo: not supported by this server", "echo")
        if self.suffix:
            raise APIError(400, "suffix: not supported by this server", "suffix")

    def prompts(self) -> list:
        """Each prompt as a str or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt: empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def validation_message(errors) -> tuple:
    """(message, param) of pydantic/FastAPI validation errors, naming the first field."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return f"the request body is not valid JSON ({ctx.get('error', 'parse error')})", None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        return f"'{param}' is a required property", param
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return (f"{param}: {msg}" if param else msg), param
