"""The Ray Serve application: one `Recommender` deployment behind a FastAPI ingress.

    serve run serving/serve_config.yaml                    (or: python -m serving --config ... --workdir ...)
    POST /v1/predict   GET /v1/adapters   GET /healthz   POST /v1/forget   GET /v1/forget/{id}   /docs

A replica holds the live adapter set (`<experiment>.adapter-set@live`) in memory as one immutable
`View` (the loaded set + the shards masked right now), kept by a `serving.follower.LiveSetFollower`:
a request reads `self.view` once and uses that view for all its rows; the follower polls the
registry, loads a new set off the event loop and swaps it in with a single assignment, and applies
mask changes the same way. Each
candidate of a request is one prompt row; rows of all concurrent requests are batched by
`@serve.batch` into one forward pass, every row mixed with its own shard weights.

The offline environment (components.config.OFFLINE_ENV: nothing goes to a hub) is the replicas'
runtime_env: `python -m serving` passes it to Ray, serve_config.yaml sets it, and the RayService's pods carry it.
"""

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application

from components.aggregate import candidate_prompts, history_split, unknown_items
from components.config import Config, ServingConfig, load_config
from components.data import load_interactions_and_items
from components.registry import Registry
from components.store import Workdir, check_inputs
from serving.follower import LiveSetFollower, View
from serving.http import (
    REQUEST_ID,
    ForgetAccepted,
    ForgetBody,
    ForgetStatus,
    Health,
    Prediction,
    PredictRequest,
    PredictResponse,
    api,
    errors,
    set_limits,
    validation_message,
)

logger = logging.getLogger("ray.serve")
_DEFAULTS = ServingConfig()  # @serve.batch's limits until the replica applies its config
BEARER = [{"bearer": []}]  # the forget routes' security requirement (the scheme is in serving.http)
RECONCILER_CHECK_S = 10.0  # how often a replica makes sure the forget reconciler exists
app = api(title="Exact-unlearning recommender", version="1",
          description="TALLRec-style P(yes) from K shard adapters mixed per request (APA); exact forgetting.")


# --- the deployment -----------------------------------------------------------------------------


def _resolve(path: str) -> Path:
    return Path(path).expanduser().resolve()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(app)
class Recommender:
    async def __init__(self, config: str, workdir: str):
        self.config_path = _resolve(config)
        self.config: Config = load_config(self.config_path)
        self.workdir = Workdir(_resolve(workdir))
        serving = self.config.serving
        set_limits(serving)
        self._score_rows.set_max_batch_size(serving.max_batch_size)
        self._score_rows.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)
        try:
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        except Exception:  # noqa: BLE001 - outside Ray (local testing mode)
            cpus = 1
        torch.set_num_threads(max(1, int(round(cpus))))
        items = load_interactions_and_items(self.config.data)[1]
        self.titles = {str(i): str(t) for i, t in zip(items["item_id"], items["title"])}
        self.registry = Registry(self.config.experiment, self.workdir.root)
        self.follower = await LiveSetFollower.start(self.config, self.registry)
        self._reconciler = None
        self._reconciler_checked = 0.0
        self._poller = asyncio.create_task(self.follower.follow(between_polls=self._check_reconciler))
        view = self.follower.view
        logger.info("serving adapter set %s (%s, shards %s, masked %s) from %s", view.served.version, view.served.method,
                    view.served.mixture.shards, sorted(view.masked), self.workdir.root)

    @property
    def view(self) -> View:
        return self.follower.view

    def _check_reconciler(self) -> None:
        if time.time() - self._reconciler_checked > RECONCILER_CHECK_S:
            self._ensure_reconciler()  # outside a cluster, or the GCS busy: the follower logs it, the next check tries again

    def check_health(self) -> None:
        """Serve's replica health check: the follower must be alive and recent."""
        if self._poller.done():
            raise RuntimeError("the registry follower stopped")

    # --- scoring: rows of every concurrent request, batched ---------------------------------------
    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _score_rows(self, rows: list[tuple[View, str]]) -> list[tuple[float, np.ndarray, float]]:
        return await asyncio.to_thread(self._score, rows)

    def _score(self, rows: list[tuple[View, str]]) -> list[tuple[float, np.ndarray, float]]:
        """One forward per distinct view in the batch (normally one), each row with its own weights."""
        groups: dict[int, tuple[View, list[int]]] = {}
        for index, (view, _) in enumerate(rows):
            groups.setdefault(id(view), (view, []))[1].append(index)
        results: list[Any] = [None] * len(rows)
        for view, indices in groups.values():
            scores, weights, dropped = view.served.predict(self.config, [rows[i][1] for i in indices], view.masked)
            for j, i in enumerate(indices):
                results[i] = (float(scores[j]), weights[j], float(dropped[j]))
        return results

    # --- routes ------------------------------------------------------------------------------------
    @app.post("/v1/predict", response_model=PredictResponse, responses=errors(400, 413, 422, 503))
    async def predict(self, body: PredictRequest) -> PredictResponse:
        """P(yes) for each candidate, given a history (item ids + ratings) or liked/disliked titles."""
        limits, data = self.config.serving, self.config.data
        if not body.candidates:
            raise HTTPException(422, "candidates: the list is empty; give at least one item id")
        if len(body.candidates) > limits.max_candidates:
            raise HTTPException(422, f"candidates: {len(body.candidates)} items, more than the limit of "
                                     f"{limits.max_candidates} (serving.max_candidates)")
        history_size = len(body.history) if body.history is not None else len(body.liked or []) + len(body.disliked or [])
        if history_size > limits.max_history:
            field = "history" if body.history is not None else "liked + disliked"
            raise HTTPException(422, f"{field}: {history_size} items, more than the limit of "
                                     f"{limits.max_history} (serving.max_history)")
        for field, ids in (("candidates", body.candidates), ("history", [h.item_id for h in body.history or []])):
            unknown = unknown_items(ids, self.titles)
            if unknown:
                shown = ", ".join(map(repr, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
                raise HTTPException(422, f"{field}: unknown item id(s) {shown}")
        if body.history is not None:
            liked, disliked = history_split([(h.item_id, h.rating) for h in body.history], self.titles,
                                            data.liked_above, data.history_len)
        else:
            liked, disliked = list(body.liked or []), list(body.disliked or [])
        view = self.view  # one read: every row of this request uses the same set and masks
        if not view.served.serving(view.masked):
            raise HTTPException(503, f"every shard is masked {sorted(view.masked)}: no adapter may serve until "
                                     f"the forget job registers clean versions")
        prompts = candidate_prompts(liked, disliked, body.candidates, self.titles, data.prompt)
        rows = await asyncio.gather(*(self._score_rows((view, prompt)) for prompt in prompts))
        shards = view.served.mixture.shards
        predictions = [Prediction(item_id=item, p_yes=p, weights={str(k): float(w[i]) for i, k in enumerate(shards)},
                                  dropped_weight=d) for item, (p, w, d) in zip(body.candidates, rows)]
        mean = np.mean(np.stack([w for _, w, _ in rows]), axis=0)
        return PredictResponse(predictions=predictions, weights={str(k): float(mean[i]) for i, k in enumerate(shards)},
                               dropped_weight=float(np.mean([d for _, _, d in rows])),
                               adapter_set_version=view.served.version, masked_shards=sorted(view.masked),
                               method=view.served.method)

    @app.get("/v1/adapters")
    async def adapters(self) -> dict:
        """The live adapter set this replica serves: each shard's registered name, version and sha256."""
        view = self.view
        return {
            "adapter_set_version": view.served.version,
            "method": view.served.method,
            "masked_shards": sorted(view.masked),
            "shards": {str(k): {**info, "masked": k in view.masked} for k, info in sorted(view.served.shards.items())},
            "loading": self.follower.loading is not None,
            "last_poll_age_s": round(time.time() - self.follower.last_poll, 3),
        }

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "every shard is masked"}})
    async def healthz(self) -> JSONResponse:
        """Serving status, the share of the training data served and masked now, and the forget requests:
        how many wait, which failed (and why), the reconciler."""
        from components.reconcile import summary
        from components.unlearn import all_requests, data_share, shard_sizes

        view = self.view
        serving = view.served.serving(view.masked)
        sizes = await asyncio.to_thread(shard_sizes, self.workdir)  # Parquet footers: no data read
        forget = await asyncio.to_thread(summary, self.workdir, await asyncio.to_thread(all_requests, self.workdir))
        forget["reconciler"] = await asyncio.to_thread(self._reconciler_status)
        payload = Health(status="ok" if serving else "unavailable: every shard is masked", adapter_set_version=view.served.version,
                         serving_shards=serving, masked_shards=sorted(view.masked),
                         served_share=round(data_share(sizes, serving), 4), masked_share=round(data_share(sizes, view.masked), 4),
                         max_masked_share=self.config.forget.max_masked_share, forget=forget)
        return JSONResponse(payload.model_dump(), status_code=200 if serving else 503)

    # --- forgetting --------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        token = self.config.forget_token_value()
        if not token:
            raise HTTPException(503, f"forgetting over HTTP is disabled: set ${self.config.serving.forget_token_env} "
                                     f"or serving.forget_token")
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/forget", status_code=202, response_model=ForgetAccepted, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": ForgetBody.model_json_schema()}}}, "security": BEARER},
        responses={200: {"model": ForgetAccepted, "description": "this request id is known and finished (done, failed or abandoned)"},
                   **errors(401, 413, 422, 503)})
    async def forget(self, request: Request) -> JSONResponse:
        """Forget users and/or USER:ITEM interactions: the affected shards are masked at once (unless
        that would mask more than forget.max_masked_share of the training data: then the request
        waits for the next round, and `waiting` says so); the reconciler runs the exact forget job
        (retrain from the last clean slice, swap, purge, audit) as a Ray job, and again after a
        failure, until the request is done."""
        from components.unlearn import STATES, RequestError

        self._authorize(request)  # before the body is even parsed
        try:
            body = ForgetBody.model_validate_json(await request.body())
        except ValidationError as err:
            raise HTTPException(422, validation_message(err.errors(include_url=False))) from None
        # Under the mask lock: concurrent requests decide against the bound one after another (each
        # sees the shards masked before it, so together they cannot pass it), and the poller cannot
        # undo a mask with a stale read.
        async with self.follower.lock:
            try:
                record = await asyncio.to_thread(self._record, body)
            except RequestError as err:
                raise HTTPException(422, str(err)) from None
            affected = {int(s) for s in record.affected_shards}
            pending = record.state in STATES[:-1]  # a repeated request id may be done, failed or abandoned
            # Only a request not yet in a round masks here: a round masks its requests' shards itself,
            # within forget.max_masked_share (its deferred shards keep serving), and a repeated id must
            # not mask them all again.
            if record.state == "received" and not record.waiting:
                self.follower.mask(affected)  # this replica: at once
                await asyncio.to_thread(self._mask_in_registry, affected)  # every replica: next poll
        if pending and self._reconciler is None:  # the reconciler picks the request up within a second
            try:
                await asyncio.to_thread(self._ensure_reconciler)
            except Exception:  # noqa: BLE001 - the request is recorded: the poller's next check starts it
                logger.exception("could not reach the forget reconciler")
        payload = ForgetAccepted(request_id=record.request_id, affected_shards=sorted(affected),
                                 status_url=f"/v1/forget/{record.request_id}", state=record.state, waiting=record.waiting)
        return JSONResponse(payload.model_dump(), status_code=202 if pending else 200)

    def _record(self, body: ForgetBody):
        """Record the request; it waits unmasked where masking it now would pass forget.max_masked_share."""
        from components.unlearn import hold_new_requests, new_request

        hold = hold_new_requests(self.workdir, self.registry.masked_shards(), self.config.forget.max_masked_share)
        return new_request(self.workdir, body.users, body.interactions, request_id=body.request_id, source="http", hold=hold)

    def _mask_in_registry(self, shards: set[int]) -> None:
        if shards and not shards <= (masked := self.registry.masked_shards()):  # a burst of requests: one write per shard
            self.registry.set_masked_shards(masked | shards)

    def _ensure_reconciler(self) -> None:
        """The work dir's forget reconciler (a detached Ray actor, restarted by Ray): re-created if gone."""
        from ray_jobs.reconcile import ensure_reconciler

        self._reconciler = ensure_reconciler(self.config_path, self.workdir.root)
        self._reconciler_checked = time.time()

    def _reconciler_status(self) -> dict:
        import ray

        try:
            return ray.get(self._reconciler.status.remote(), timeout=2) if self._reconciler else {"running": False}
        except Exception as err:  # noqa: BLE001 - dead or restarting: say so
            return {"running": False, "error": type(err).__name__}

    @app.get("/v1/forget/{request_id}", response_model=ForgetStatus, responses=errors(401, 404, 422, 503),
             openapi_extra={"security": BEARER})
    async def forget_status(self, request: Request, request_id: str = PathParam(pattern=REQUEST_ID)) -> dict:
        """A forget request: its state and history, attempts, the current Ray job (submission id and
        status), the last error and the time of the next retry; the ids to forget are not echoed."""
        from components.reconcile import request_status

        self._authorize(request)
        status = await asyncio.to_thread(request_status, self.workdir, request_id)
        if status is None:
            raise HTTPException(404, f"unknown forget request {request_id!r}")
        return status


# --- the application builder: `serve run` / `serve deploy` / RayService import_path ---------------------


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str
    workdir: str | None = None  # default runs/<experiment>


def build_app(args: dict) -> Application:
    """`serving.app:build_app` with args {"config": FILE, "workdir": DIR}. Paths that exist here are
    made absolute (the replica may run in another directory); others are resolved by the replica."""
    parsed = AppArgs.model_validate(dict(args or {}))
    config = load_config(parsed.config)  # a bad config fails here, with the file and the key
    workdir = parsed.workdir or str(Path("runs") / config.experiment)
    check_inputs(config, Workdir(workdir))  # and bad data or model files here, naming file and column
    absolute = lambda p: str(Path(p).resolve()) if Path(p).exists() else p  # noqa: E731
    replicas = config.serving.replicas
    # Several replicas go to different nodes: one node lost must not take every replica with it.
    deployment = Recommender.options(num_replicas=replicas, max_replicas_per_node=1 if replicas > 1 else None)
    return deployment.bind(absolute(parsed.config), absolute(workdir))
