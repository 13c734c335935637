"""Request bodies of the API (pydantic): what a well-formed request looks like.

Unknown OpenAI fields (`user`, `seed`, `presence_penalty`, ...) are accepted and ignored on chat
requests, as OpenAI clients send them; the memory endpoints refuse unknown fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    tools: list | None = None
    logprobs: bool | None = None
    session: str | None = None  # latentmem: which of the user's memories to read


class InjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    source: str = Field("", max_length=256)
    allow_short: bool = False
    session: str | None = None


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    session: str | None = None
