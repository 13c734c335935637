"""Request bodies of the API (pydantic): what a well-formed request looks like.

Unknown OpenAI fields (`user`, `seed`, `presence_penalty`, ...) are accepted and ignored on chat
requests, as OpenAI clients send them; the memory endpoints refuse unknown fields. Every string
must be valid Unicode: JSON can spell a lone surrogate (`"\\ud800"`), which no tokenizer or file
can hold, so it is refused here with the field's name.

Sessions also come outside the body (`?session=`, `X-Latentmem-Session`); `SESSION_PARAMETERS`
describes them in the OpenAPI schema (the handlers read them from the request).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[err.start]!r} at character {err.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None  # if given, the name /v1/models lists
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    tools: list | None = None
    logprobs: bool | None = None
    session: Text | None = None  # latentmem: which of the user's memories to read


class InjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text
    source: Text = Field("", max_length=256)
    allow_short: bool = False
    session: Text | None = None


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Text
    session: Text | None = None


SESSION_PARAMETERS = {
    "parameters": [
        {"name": "session", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "X-Latentmem-Session", "in": "header", "required": False, "schema": {"type": "string"}},
    ]
}
IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
