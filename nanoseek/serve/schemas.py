"""What goes over the wire: the request models (validated by FastAPI), OpenAI's error body and the errors of
each route for the OpenAPI schema, and `APIError`, the error every check raises."""

import json
from typing import Annotated, Literal

from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from nanoseek.text import DEFAULT_REPETITION_STOP, MAX_PERIOD


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, close=False):
        """OpenAI's error JSON (ASCII, so any text echoed back encodes); `close` ends the connection too."""
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers={"connection": "close"} if close else None)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def api_error(exc):
    """The HTTP error for what the worker reported: bad input is the client's, anything else the server's."""
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), "server_error")


def _valid_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=1_000_000)
    reasoning_content: Text | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid JSON or Unicode, an unsupported field, a prompt and max_tokens over the context, more "
          "sequences than the server has slots, or a Host header this server does not answer to"),
    (401, "missing or wrong API key"), (404, "unknown model"), (408, "the request body did not arrive in time"),
    (413, "request body too large"), (422, "invalid fields"), (429, "every engine slot is taken"),
    (500, "generation failed; the server goes on serving"))}
STREAMABLE = {200: {"description": "a completion, or server-sent events of chunks when stream is true",
                    "content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept so that unsupported fields can be refused by name
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Text | list[Text] | None = None
    max_tokens: int | None = Field(None, ge=1)
    repetition_stop: int = Field(DEFAULT_REPETITION_STOP, ge=0, description=(  # an extension of OpenAI's API
        f"end a choice with finish_reason 'repetition' once it ends in a block of up to {MAX_PERIOD} tokens "
        "repeated back to back over this many tokens; 0: off"))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    trim_history: bool = Field(False, description=(  # an extension of OpenAI's API
        "drop the oldest turns (a user message and the replies after it; never a system message or the last user "
        "message) until the prompt leaves half of the context the model was trained on for the reply, and say how "
        "many in usage.dropped_turns; refused with context_length_exceeded when the system messages and the last "
        "user message alone fill that context. false: the messages are used whole, and refused when they fill "
        "the server's context"))


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(not p for p in v))):
            raise ValueError("prompt must be a non-empty string or a list of them")
        return v
