"""Strict models of OpenAI's batch output line, for tests: the openai package types the response
body (ChatCompletion, ErrorObject …) but has no model for the line envelope itself
(openai-openapi's BatchRequestOutput)."""

from __future__ import annotations

from typing import Any

from openai.types import ErrorObject
from pydantic import BaseModel, ConfigDict


class BatchResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    status_code: int
    request_id: str | None
    body: dict[str, Any]


class BatchLineError(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """openai-openapi BatchRequestOutput."""
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchLineError | None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    error: ErrorObject
