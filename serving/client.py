"""A typed Python client for the recommender's HTTP API.

    from serving.client import RecommenderClient
    with RecommenderClient("http://127.0.0.1:8000") as client:
        result = client.predict(candidates=[50, 181], history=[(1, 5), (121, 2)])
        print(result.predictions[0].p_yes, result.adapter_set_version)
        accepted = client.forget(users=["13"], token=os.environ["UNLEARN_FORGET_TOKEN"])

Every 4xx/5xx answer raises RecommenderError carrying the server's status and message. Predictions and
reads are sent again when Ray Serve, not the application, failed them (see `_lost_by_serve`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx

ItemId = int | str
logger = logging.getLogger(__name__)
RETRY_BACKOFF_S = 0.2  # doubled on each retry: 0.2, 0.4, 0.8 s


class RecommenderError(Exception):
    """The server refused a request; `status_code` and `detail` (the server's message) say why."""

    def __init__(self, status_code: int, detail: str, method: str = "", url: str = ""):
        self.status_code, self.detail, self.method, self.url = status_code, detail, method, url
        super().__init__(f"{status_code} from {method} {url}: {detail}".replace("  ", " "))


@dataclass(frozen=True)
class Prediction:
    item_id: ItemId
    p_yes: float
    weights: dict[int, float] = field(default_factory=dict)  # shard -> this row's weight
    dropped_weight: float = 0.0  # the APA weight mass a sparse mixture left out of this row


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    weights: dict[int, float]  # shard -> mean weight over the candidates
    adapter_set_version: str
    masked_shards: list[int]
    method: str
    dropped_weight: float = 0.0  # mean over the candidates of the weight mass a sparse mixture left out

    def p_yes(self) -> dict[ItemId, float]:
        return {p.item_id: p.p_yes for p in self.predictions}


@dataclass(frozen=True)
class ForgetAccepted:
    request_id: str
    affected_shards: list[int]
    status_url: str
    state: str
    waiting: str | None = None  # why its shards are not masked yet (forget.max_masked_share), and when they will be


def _lost_by_serve(response: httpx.Response) -> bool:
    """A 5xx that the application did not write (its errors are JSON {"detail": ...}): Ray Serve's own
    answer. Serve gives a request whose replica died under it (a lost node) a plain-text 500 and does
    not send it to another replica itself; the request never completed, so an idempotent one may be
    sent again."""
    if response.status_code < 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "detail" in body)


def _shard_keys(weights: Mapping[str, float]) -> dict[int, float]:
    return {int(k): float(v) for k, v in weights.items()}


class RecommenderClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, token: str | None = None,
                 transport: httpx.BaseTransport | None = None, retries: int = 3):
        self.token, self.retries = token, retries
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, idempotent: bool, **kwargs) -> httpx.Response:
        """One request; an idempotent one is sent again, up to `retries` times, when Serve lost it or
        the connection failed (a proxy restarting). Forgetting is not retried: it is not idempotent."""
        retries = self.retries if idempotent else 0
        for attempt in range(retries):
            try:
                response = self._http.request(method, path, **kwargs)
                if not _lost_by_serve(response):
                    return response
                reason = f"{response.status_code} {response.text[:100]!r} from Ray Serve"
            except (httpx.ConnectError, httpx.RemoteProtocolError) as err:
                reason = f"{type(err).__name__}: {err}"
            logger.warning("%s %s: %s; sending it again (retry %d of %d)", method, path, reason, attempt + 1, retries)
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
        return self._http.request(method, path, **kwargs)  # the last try: its answer or its error stands

    def _call(self, method: str, path: str, token: str | None = None, idempotent: bool = True, **kwargs) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self._send(method, path, idempotent, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise RecommenderError(response.status_code, str(detail), method, str(response.request.url))
        return response.json()

    def predict(self, candidates: Iterable[ItemId], history: Iterable[tuple[ItemId, float] | Mapping] | None = None,
                liked: Iterable[str] | None = None, disliked: Iterable[str] | None = None,
                user_id: str | None = None) -> PredictResult:
        """P(yes) for each candidate given a history of (item id, rating), oldest first, or
        liked / disliked titles."""
        body: dict = {"candidates": list(candidates)}
        if history is not None:
            body["history"] = [dict(h) if isinstance(h, Mapping) else {"item_id": h[0], "rating": h[1]} for h in history]
        if liked is not None or disliked is not None:
            body["liked"], body["disliked"] = list(liked or []), list(disliked or [])
        if user_id is not None:
            body["user_id"] = user_id
        raw = self._call("POST", "/v1/predict", json=body)
        return PredictResult(
            predictions=[Prediction(p["item_id"], float(p["p_yes"]), _shard_keys(p.get("weights", {})),
                                    float(p.get("dropped_weight", 0.0))) for p in raw["predictions"]],
            weights=_shard_keys(raw["weights"]), adapter_set_version=str(raw["adapter_set_version"]),
            masked_shards=[int(s) for s in raw["masked_shards"]], method=raw.get("method", ""),
            dropped_weight=float(raw.get("dropped_weight", 0.0)),
        )

    def adapters(self) -> dict:
        """The live adapter set: version, method, masked shards, each shard's name/version/sha256."""
        return self._call("GET", "/v1/adapters")

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def forget(self, users: Iterable[str] = (), interactions: Iterable[str] = (), token: str | None = None,
               request_id: str | None = None) -> ForgetAccepted:
        """Ask to forget users and/or USER:ITEM interactions (needs the forget bearer token)."""
        body: dict = {"users": [str(u) for u in users], "interactions": [str(i) for i in interactions]}
        if request_id is not None:
            body["request_id"] = request_id
        raw = self._call("POST", "/v1/forget", token=token or self.token, idempotent=False, json=body)
        return ForgetAccepted(raw["request_id"], [int(s) for s in raw["affected_shards"]], raw["status_url"], raw.get("state", ""),
                              raw.get("waiting"))

    def forget_status(self, request_id: str, token: str | None = None) -> dict:
        """A request's state and history, attempts, its Ray job (submission_id, status), last_error,
        next_retry_at (and failed_at, error once failed)."""
        return self._call("GET", f"/v1/forget/{request_id}", token=token or self.token)
