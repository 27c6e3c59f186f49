"""The HTTP surface of the serving app: request and response bodies, the body-size limit, and the
error shapes (every error is {"detail": "<message>"}, bad input a 4xx naming the problem)."""

import json
import logging
import math
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

from components.config import ServingConfig

logger = logging.getLogger("ray.serve")


# --- request and response bodies ----------------------------------------------------------------


def _item_id(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not 0 < len(value) <= 64):
        raise ValueError(f"an item id is an integer or a string of 1 to 64 characters, got {value!r}")
    return value


def _rating(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"a rating is a finite number, got {value!r}")
    return float(value)


ItemId = Annotated[int | str, PlainValidator(_item_id), WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]})]
Rating = Annotated[float, PlainValidator(_rating), WithJsonSchema({"type": "number"})]
Title = Annotated[str, Field(strict=True, min_length=1, max_length=300)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEntry(Body):
    item_id: ItemId
    rating: Rating


class PredictRequest(Body):
    """Either a history of rated item ids (oldest first; the latest `data.history_len` are used,
    liked if rating > `data.like_threshold`), or liked / disliked titles directly."""

    user_id: Annotated[str, Field(strict=True, max_length=128)] | None = Field(
        None, description="optional, for the caller's bookkeeping: not used to predict and not stored")
    history: list[HistoryEntry] | None = None
    liked: list[Title] | None = None
    disliked: list[Title] | None = None
    candidates: list[ItemId] = Field(description="item ids to score")

    @model_validator(mode="after")
    def _one_form(self):
        titles = self.liked is not None or self.disliked is not None
        if self.history is not None and titles:
            raise ValueError("give either history or liked/disliked, not both")
        if self.history is None and not titles:
            raise ValueError("give a history (item ids with ratings) or liked/disliked titles")
        return self


class Prediction(BaseModel):
    item_id: int | str
    p_yes: float = Field(description="P(' Yes') of the mixed model for this candidate")
    weights: dict[str, float] = Field(description="this row's weight per shard (masked shards 0)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    weights: dict[str, float] = Field(description="mean of the rows' shard weights over the candidates")
    adapter_set_version: str
    masked_shards: list[int]
    method: str


class ForgetBody(Body):
    users: list[Annotated[str, Field(strict=True, min_length=1, max_length=128)]] = []
    interactions: list[Annotated[str, Field(strict=True, min_length=3, max_length=257)]] = Field(
        [], description="USER:ITEM pairs")
    request_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)] | None = None


class ForgetAccepted(BaseModel):
    request_id: str
    affected_shards: list[int]
    status_url: str
    state: str


# --- the app: limits and error shapes (every error is {"detail": "<message>"}) ----------------------

_body_limit = {"bytes": ServingConfig().max_body_bytes}  # set from the config by the replica (one per process)


def set_body_limit(size: int) -> None:
    _body_limit["bytes"] = size


class BodyLimit:
    """Refuse bodies over `serving.max_body_bytes`: by Content-Length, and by counting what arrives
    (chunked bodies, or a Content-Length that lies)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _body_limit["bytes"]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await _send_error(send, 400, "Content-Length is not a number")
            if int(declared) > limit:
                return await _send_error(send, 413, _too_large(int(declared), limit))
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI passes an HTTPException from reading the body through
                    raise HTTPException(413, _too_large(received, limit, at_least=True))
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as err:  # raised by counting_receive outside any route's error handling
            if started or err.status_code != 413:
                raise
            await _send_error(send, 413, err.detail)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"request body of {'more than ' if at_least else ''}{size} bytes is larger than the limit of "
            f"{limit} bytes (serving.max_body_bytes)")


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def validation_message(errors, content_type: str | None = None) -> str:
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if not str(p).startswith("function-plain[")]
        kind, msg = e.get("type"), e.get("msg", "invalid")
        if kind == "json_invalid":
            error = (e.get("ctx") or {}).get("error", "")
            parts.append(f"body: not valid JSON ({error}{' at position ' + loc[1] if len(loc) > 1 else ''})")
            continue
        if kind == "model_attributes_type" and loc == ["body"] and "json" not in (content_type or ""):
            parts.append("body: expected a JSON object with Content-Type: application/json")
            continue
        msg = "unknown field" if kind == "extra_forbidden" else msg.removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


async def _invalid(request: Request, err: RequestValidationError):
    return JSONResponse({"detail": validation_message(err.errors(), request.headers.get("content-type"))}, status_code=422)


async def _unexpected(request: Request, err: Exception):
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)


def api(**fastapi_args) -> FastAPI:
    """The FastAPI ingress with the body limit and the error shapes installed."""
    app = FastAPI(**fastapi_args)
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
    return app
