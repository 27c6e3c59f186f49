"""The HTTP surface of the serving app: request and response bodies, the body-size limit, and the
error shapes (every error is {"detail": "<message>"}, bad input a 4xx naming the problem)."""

import json
import logging
import math
from typing import Annotated, Any, Literal

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


ItemId = Annotated[int | str, PlainValidator(_item_id),
                   WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": 64}]})]
Rating = Annotated[float, PlainValidator(_rating), WithJsonSchema({"type": "number"})]
Title = Annotated[str, Field(strict=True, min_length=1, max_length=300)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEntry(Body):
    item_id: ItemId
    rating: Rating


# Exactly one of the two forms (the model validator below says the same in words).
_ONE_FORM = {"oneOf": [
    {"required": ["history"], "not": {"anyOf": [{"required": ["liked"]}, {"required": ["disliked"]}]}},
    {"not": {"required": ["history"]}, "anyOf": [{"required": ["liked"]}, {"required": ["disliked"]}]},
]}


class PredictRequest(Body):
    """Either a history of rated item ids (oldest first; the latest `data.history_len` are used,
    liked if rating > `data.like_threshold`, or if 1 where the log has a 0/1 `data.label_column`), or
    liked / disliked titles directly (together at most
    `serving.max_history`). Item ids must be in the catalogue (else 422)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_FORM)

    # Absent fields are None; an explicit null is refused, as the schema says (no "null" type).
    user_id: Annotated[str, Field(strict=True, max_length=128)] = Field(
        None, description="optional, for the caller's bookkeeping: not used to predict and not stored")
    history: list[HistoryEntry] = None
    liked: list[Title] = None
    disliked: list[Title] = None
    candidates: list[ItemId] = Field(description="item ids to score", json_schema_extra={"minItems": 1})  # the route says why

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
    weights: dict[str, float] = Field(description="this row's weight per shard (masked shards 0; under a sparse "
                                               "mixture the kept shards' weights renormalised, the others 0)")
    dropped_weight: float = Field(0.0, description="the APA weight mass a sparse mixture (aggregate.top_m, "
                                                   "aggregate.weight_mass) left out of this row; 0 when dense")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    weights: dict[str, float] = Field(description="mean of the rows' shard weights over the candidates")
    dropped_weight: float = Field(0.0, description="mean over the candidates of the weight mass left out")
    adapter_set_version: str
    masked_shards: list[int]
    method: str


REQUEST_ID = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"  # also a file name: no '/', no leading '.'
RequestId = Annotated[str, Field(strict=True, pattern=REQUEST_ID, description="letters, digits, '-', '_', '.' (not first); at most 128")]


class ForgetBody(Body):
    """At least one user or interaction (ids are trimmed of surrounding blanks)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["users"], "properties": {"users": {"minItems": 1}}},
        {"required": ["interactions"], "properties": {"interactions": {"minItems": 1}}}]})

    users: list[Annotated[str, Field(strict=True, min_length=1, max_length=128, pattern=r"\S")]] = []
    interactions: list[Annotated[str, Field(strict=True, min_length=3, max_length=257,
                                            pattern=r"^[^:]*[^:\s][^:]*:[^:]*[^:\s][^:]*$")]] = Field(
        [], description="USER:ITEM pairs")
    request_id: RequestId = None


State = Literal["received", "masked", "deleted", "interim", "retrained", "registered", "unmasked", "purged", "done", "failed", "abandoned"]


class ForgetAccepted(BaseModel):
    request_id: str
    affected_shards: list[int]
    status_url: str
    state: State
    waiting: str | None = Field(None, description="why its shards are not masked yet and when they will be, if they are not")


class ForgetJob(BaseModel):
    submission_id: str = Field(description="the Ray job (`ray job status <id>`, `ray job logs <id>`)")
    status: str = Field(description="PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, or LOST (unknown to the cluster)")


class ForgetStatus(BaseModel):
    request_id: str
    state: State
    source: str
    created: float
    affected_shards: list[int]
    subject_hash: str = Field(description="salted hash of the subject: the ids to forget are never echoed")
    history: list[tuple[str, float]] = Field(description="[state, unix time] for every state reached")
    attempts: int = Field(description="Ray jobs submitted for this request so far")
    job: ForgetJob | None = Field(description="the latest job, or none yet")
    last_error: str | None
    next_retry_at: float | None = Field(description="unix time of the next job submission after a failure, if one is due")
    note: str | None = Field(description="why the request is waiting, if it is")
    waiting: str | None = Field(None, description="why its shards are not masked yet and when they will be: it waits for "
                                                  "the next round (forget.max_masked_share)")
    deferred_shards: list[int] | None = Field(None, description="its round's shards left serving until their clean versions are "
                                                                "live, where masking them too would pass forget.max_masked_share")
    failed_at: str | None = Field(None, description="for a failed request: the state it failed in")
    error: str | None = Field(None, description="for a failed request: why")


class Health(BaseModel):
    status: str
    adapter_set_version: str
    serving_shards: list[int]
    masked_shards: list[int]
    served_share: float = Field(ge=0, le=1, description="share of the training samples (the store's shard files now) whose shard "
                                                         "this replica serves: in its adapter set and not masked (a shard serving "
                                                         "from a clean slice checkpoint while it retrains counts)")
    masked_share: float = Field(ge=0, le=1, description="share of the training samples whose shard is masked (serves nothing)")
    max_masked_share: float = Field(description="forget.max_masked_share: the bound on masked_share that forget requests keep")
    forget: dict[str, Any] = Field(description="pending requests, failed ones with their errors, and the reconciler's state")


class ErrorBody(BaseModel):
    detail: str


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for the error codes a route can send, each with the {"detail": ...} body."""
    text = {400: "malformed request (Content-Length not a number)", 401: "no or wrong bearer token", 404: "not found",
            413: "body larger than serving.max_body_bytes", 422: "invalid input: the message names the problem",
            503: "unavailable (the message says why)"}
    return {code: {"model": ErrorBody, "description": text[code]} for code in codes}


# --- the app: limits and error shapes (every error is {"detail": "<message>"}) ----------------------

_body_limit = {"bytes": ServingConfig().max_body_bytes}  # set from the config by the replica (one per process)
_list_limits = {"candidates": ServingConfig().max_candidates, "history": ServingConfig().max_history}


def set_limits(serving: ServingConfig) -> None:
    """The replica's limits: enforced by BodyLimit and the routes, stated in the OpenAPI schema."""
    _body_limit["bytes"] = serving.max_body_bytes
    _list_limits.update(candidates=serving.max_candidates, history=serving.max_history)


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
    generate = app.openapi

    def openapi() -> dict:
        """FastAPI's schema with the configured list limits (pydantic cannot know them at import)."""
        if app.openapi_schema is None:
            schema = generate()
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description":
                                                       "the forget token (serving.forget_token or $UNLEARN_FORGET_TOKEN)"}}
            for name, model in schema["components"]["schemas"].items():
                if name.startswith("PredictRequest"):
                    model["properties"]["candidates"]["maxItems"] = _list_limits["candidates"]
                    for field in ("history", "liked", "disliked"):
                        model["properties"][field]["maxItems"] = _list_limits["history"]
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
    return app
