"""The request and response shapes of the OpenAI-compatible API, plus flexmoe's additions.

Requests take `experts: {include, exclude}`, `use` and `token_experts` next to the OpenAI
fields (the official client sends them via `extra_body`). Errors use OpenAI's shape so the
official clients show all of them. No HTTP or model code here: the server and the app share it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExpertChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include: list[str] | None = Field(None, max_length=256)
    exclude: list[str] | None = Field(None, max_length=256)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=4)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    experts: ExpertChoice | None = None
    use: Literal["research", "commercial"] | None = None
    token_experts: bool = False  # per generated token: the expert with most routing weight


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(CompletionRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error shape, so the official clients show all of it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
