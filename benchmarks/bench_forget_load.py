"""A thousand forget requests against the real server while it keeps answering (issue 30, part 2).

    python -m benchmarks.bench_forget_load                          # 1000 requests over 60 s, K=16 (make bench-full)
    python -m benchmarks.bench_forget_load --requests 200 --shards 16 --max-wait-minutes 30

The tiny model (configs/tiny.yaml, with K shards and `--n-train` samples so that there are enough
distinct training users) is trained once into its own work dir; Ray Serve serves it over HTTP on
127.0.0.1 and launches the forget jobs as in production (the replica starts the reconciler, which
submits Ray jobs; nobody else acts). Then `--requests` POST /v1/forget arrive at a steady rate over
`--seconds` from a pool of clients: requests for `--user-share` of the distinct training users
(default half: forgetting all would leave nothing to serve; the rest of the posts are second requests
of their own for those users), the same request id posted again, unknown users and malformed bodies, each
checked against its documented answer (202; 200 for a finished id posted again; 401, 413 or 422
naming the problem). A predict loop runs from an idle phase before the load until every request is
done, and /healthz is sampled every second (the served share of the training data).

Reported: rounds and shard retrains per round; time to masked (the 202 of a request masked at
once: the replica masks before answering; for a request that had to wait for a round because of
forget.max_masked_share, the time to its round's `masked` state, reported apart); time to done;
predict p99 under load against idle, and its status counts; the served share over time. Every
accepted request must reach done (checked over HTTP), none lost, every answer as documented.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, bench_config, bench_dir, finish, fresh_workdir, offline, parser, write_config
from benchmarks.forget_load_report import figures_of, markdown, rounds_of, summarize
from components.data import read_parquet, stable_hash
from components.store import Workdir

NAME = "bench_forget_load"
TINY = ROOT / "configs" / "tiny.yaml"
TOKEN = "bench-forget-load-token"
PREDICT = {"history": [{"item_id": 1, "rating": 5}, {"item_id": 50, "rating": 4}, {"item_id": 181, "rating": 1}],
           "candidates": [258, 286]}
# Malformed forget bodies and their documented answers (serving/http.py; docs/operations.md).
MALFORMED = [
    ({"json": {}}, 422, "at least one user"),
    ({"json": {"users": [1]}}, 422, "users.0"),
    ({"json": {"interactions": ["no-colon"]}}, 422, "interactions"),
    ({"json": {"users": ["1"], "request_id": "../etc"}}, 422, "request_id"),
    ({"json": {"users": ["1"], "why": 1}}, 422, "unknown field"),
    ({"content": b'{"users": [', "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"json": {"users": ["1"]}, "headers": {"Authorization": "Bearer wrong"}}, 401, "Bearer"),
    ({"json": {"users": ["x" * 100_000]}}, 413, "serving.max_body_bytes"),
]


@dataclass(eq=False)  # a post is itself: two alike are two posts
class Post:
    kind: str  # new (a training user), second (another request for a user already asked for), again (an id posted
    # again), unknown (a user not in the data), malformed
    kwargs: dict
    request_id: str | None = None
    expected: int | None = None  # None: 202 while pending, 200 once done
    message: str = ""
    sent: float = 0.0
    answered: float = 0.0
    status: int = 0
    answer: dict = field(default_factory=dict)


def request_mix(users: list[str], n: int, seed: int) -> list[Post]:
    """n posts: 5% each of malformed bodies, unknown users, ids posted again and second requests for a
    user; the rest one request per distinct training user (a shortfall of users becomes second
    requests). Seeded order; a repeat always comes after its original."""
    rng = random.Random(seed)
    extra = max(1, n // 20)
    distinct = min(len(users), n - 4 * extra)
    news = [Post("new", {"json": {"users": [u], "request_id": f"load-{i}"}}, f"load-{i}", 202) for i, u in enumerate(users[:distinct])]
    posts = list(news)
    for i in range(n - distinct - 3 * extra):  # second requests of their own for users already asked for
        original = news[rng.randrange(distinct)]
        posts.insert(rng.randrange(posts.index(original) + 1, len(posts) + 1),
                     Post("second", {"json": {"users": original.kwargs["json"]["users"], "request_id": f"load-second-{i}"}},
                          f"load-second-{i}", 202))
    for i in range(extra):
        original = news[rng.randrange(distinct)]
        posts.insert(rng.randrange(posts.index(original) + 1, len(posts) + 1),
                     Post("again", {"json": dict(original.kwargs["json"])}, original.request_id, None))
        posts.insert(rng.randrange(len(posts) + 1), Post("unknown", {"json": {"users": [f"no-such-user-{i}"],
                                                                             "request_id": f"load-unknown-{i}"}},
                                                         f"load-unknown-{i}", 202))
        kwargs, status, message = MALFORMED[i % len(MALFORMED)]
        posts.insert(rng.randrange(len(posts) + 1), Post("malformed", kwargs, None, status, message))
    return posts


def machine() -> dict:
    """The CPU (model, AVX-512 or not, cores) and the load average: the machine may be shared."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    return {"cpu": model, "avx512": "avx512f" in info, "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


@contextlib.contextmanager
def own_ray():
    """A Ray of the benchmark's own with its job server (the reconciler submits the forget jobs as Ray
    jobs): `ray start --head` with every port free, as the tests start theirs. Ray's default ports
    may belong to another Ray on this shared machine, whose dashboard agent would take our jobs."""
    import ray

    from components.config import OFFLINE_ENV
    from tests.conftest import local_cluster

    env = {k: os.environ[k] for k in (*OFFLINE_ENV, "UNLEARN_CACHE", "MLFLOW_TRACKING_URI") if k in os.environ}
    with local_cluster(os.cpu_count()) as (address, _):
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            yield
        finally:
            ray.shutdown()


def start_server(config_file: Path, workdir: Workdir) -> str:
    """Serve on 127.0.0.1 on a free port, the app as `serve run` builds it; returns its URL once healthy."""
    import httpx
    from ray import serve

    from serving.app import build_app
    from tests.conftest import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config_file), "workdir": str(workdir.root)}), name=NAME, route_prefix="/")
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while httpx.get(f"{url}/healthz", timeout=30).status_code != 200:
        if time.time() > deadline:
            raise SystemExit("the server did not become healthy in 120 s")
        time.sleep(0.5)
    return url


class Watch(threading.Thread):
    """The predict loop (status and latency of each call) and /healthz once a second, until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="watch")
        self.url, self.stop, self.predicts, self.health = url, threading.Event(), [], []

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=120) as http:
            last_health = 0.0
            while not self.stop.is_set():
                started = time.time()
                try:
                    status = http.post("/v1/predict", json=PREDICT).status_code
                except httpx.HTTPError:  # no answer at all: counted as status 0
                    status = 0
                self.predicts.append((started, time.time() - started, status))
                if started - last_health >= 1.0:
                    last_health, health = started, http.get("/healthz").json()
                    self.health.append({"t": started, **{k: health[k] for k in ("served_share", "masked_share", "masked_shards",
                                                                                 "serving_shards", "adapter_set_version")},
                                        "pending": health["forget"]["pending"]})


def post_all(url: str, posts: list[Post], seconds: float, clients: int) -> None:
    """Send the posts at a steady rate over `seconds` (each at its slot, from a pool of clients)."""
    import httpx

    local, started = threading.local(), time.time()

    def send(index: int) -> None:
        post = posts[index]
        time.sleep(max(0.0, started + index * seconds / len(posts) - time.time()))
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=300)
        kwargs = dict(post.kwargs)
        kwargs["headers"] = {"Authorization": f"Bearer {TOKEN}", **kwargs.get("headers", {})}
        post.sent = time.time()
        response = local.http.post("/v1/forget", **kwargs)
        post.answered, post.status, post.answer = time.time(), response.status_code, response.json()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(len(posts))))


def wait_done(workdir: Workdir, ids: set[str], max_wait_s: float) -> dict[str, str]:
    """Wait until every request is done (or failed), at most `max_wait_s`; returns their states."""
    from components.unlearn import load_request

    deadline, states = time.time() + max_wait_s, {}
    while time.time() < deadline:
        states = {rid: (load_request(workdir, rid) or {}).get("state", "missing") for rid in ids}
        if set(states.values()) <= {"done", "failed"}:
            break
        done = sum(s == "done" for s in states.values())
        print(f"  {time.strftime('%H:%M:%S')} {done}/{len(ids)} done; load average {os.getloadavg()[0]:.1f}", flush=True)
        time.sleep(10)
    return states


def request_timings(url: str, posts: list[Post]) -> tuple[dict, list[str]]:
    """Per accepted request, over HTTP (GET /v1/forget/<id>): its state, when it was posted, answered,
    masked and done, whether it waited for a round; and the ids not done (lost or failed)."""
    import httpx

    first = {}
    for post in posts:
        if post.kind in ("new", "second", "unknown"):
            first[post.request_id] = post
    timings, not_done = {}, []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for rid, post in first.items():
            status = http.get(f"/v1/forget/{rid}").json()
            reached = {state: at for state, at in status.get("history", [])}
            if status.get("state") != "done":
                not_done.append(f"{rid}: {status.get('state')} {status.get('last_error') or ''}")
            timings[rid] = {"kind": post.kind, "shards": post.answer.get("affected_shards", []),
                            "waited": bool(post.answer.get("waiting")), "answer_s": post.answered - post.sent,
                            "masked_s": reached["masked"] - post.sent if "masked" in reached else None,
                            "done_s": reached["done"] - post.sent if "done" in reached else None}
    return timings, not_done


def stop_serving(workdir: Workdir) -> None:
    """The reconciler, every forget job of the work dir still running, and Serve."""
    import ray
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from ray_jobs.reconcile import stop_reconciler

    try:
        stop_reconciler(workdir.root)
        client = JobSubmissionClient(ray.get_runtime_context().gcs_address)
        for job in client.list_jobs():
            if (job.metadata or {}).get("workdir") == str(workdir.root) and not job.status.is_terminal():
                client.stop_job(job.submission_id)
    finally:
        serve.shutdown()


def run(args) -> dict:
    offline()
    started, at_start = time.time(), machine()
    root = fresh_workdir(args.workdir, NAME)
    config = bench_config(args.config, "bench-forget-load", data={"n_train": args.n_train}, partition={"num_shards": args.shards},
                          serving={"forget_token": TOKEN}, forget={"max_masked_share": args.bound} if args.bound else None)
    config_file = write_config(config, root.path("config.yaml"))
    setup = (f"{config.model.label}, K={config.partition.num_shards}, R={config.partition.num_slices}, n_train {config.data.n_train}, "
             f"{config.partition.method} partition, forget.max_masked_share {config.forget.max_masked_share}, "
             f"{args.requests} requests over {args.seconds:.0f} s from {args.clients} clients for {args.user_share:.0%} of the users")
    print(f"{NAME}: {setup}; work dir {root.root}", flush=True)
    with own_ray():
        result = measure(args, config, config_file, root)
    result.update(seconds=time.time() - started, machine=at_start, load_average_end=os.getloadavg(), setup=setup)
    result["markdown"] = markdown(result)
    finish(NAME, result)
    print("\n" + result["markdown"], flush=True)
    (bench_dir() / "results").mkdir(parents=True, exist_ok=True)
    (bench_dir() / "results" / f"{NAME}.md").write_text(result["markdown"] + "\n")
    return result


def measure(args, config, config_file: Path, root: Workdir) -> dict:
    """Train, serve, post the requests while predicting, wait until every request is done, read back."""
    from ray_jobs.orchestration import train_workdir

    try:
        t = time.time()
        train_workdir(config, root)
        train_seconds = time.time() - t
        users = sorted(set(read_parquet(root.split("train"))["user_id"].astype(str)), key=lambda u: stable_hash(NAME, config.seed, u))
        # Forgetting every training user would leave no data to serve: the requests name a share of them.
        posts = request_mix(users[: max(1, round(len(users) * args.user_share))], args.requests, config.seed)
        url = start_server(config_file, root)
        watch = Watch(url)
        watch.start()
        time.sleep(args.idle_seconds)  # predict alone: the idle latency
        t0 = time.time()
        print(f"trained in {train_seconds:.0f}s; posting {len(posts)} forget requests over {args.seconds:.0f}s", flush=True)
        post_all(url, posts, args.seconds, args.clients)
        ids = {p.request_id for p in posts if p.kind in ("new", "second", "unknown")}
        print(f"posted in {time.time() - t0:.0f}s; waiting for {len(ids)} requests to be done", flush=True)
        states = wait_done(root, ids, args.max_wait_minutes * 60)
        end = time.time() if set(states.values()) <= {"done", "failed"} else float("inf")
        watch.stop.set()
        watch.join()
        timings, not_done = request_timings(url, posts)
        summary = summarize(posts, timings, not_done, rounds_of(root, sorted(ids)), watch.predicts, watch.health, t0,
                            min(end, time.time()))
    finally:
        stop_serving(root)
    return {"figures": figures_of(summary), "train_seconds": train_seconds, "complete": end != float("inf"), "summary": summary,
            "config": config.model_dump(mode="json"), "served_share_samples": watch.health}


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__.splitlines()[0], prepares=False)
    p.set_defaults(config=str(TINY))
    p.add_argument("--requests", type=int, default=1000, help="forget posts (default 1000)")
    p.add_argument("--shards", type=int, default=16, help="K (default 16)")
    p.add_argument("--seconds", type=float, default=60.0, help="posting window: a steady rate over it (default 60)")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients posting (default 32)")
    p.add_argument("--n-train", type=int, default=2048, help="training samples (default 2048: 560 distinct users)")
    p.add_argument("--user-share", type=float, default=0.5,
                   help="share of the training users the requests forget (default 0.5; 1 leaves no data to serve)")
    p.add_argument("--bound", type=float, help="forget.max_masked_share (default: the config's, 0.5)")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="predict alone before the load (default 20)")
    p.add_argument("--max-wait-minutes", type=float, default=240.0, help="give up waiting for done after this (default 240)")
    args = p.parse_args(argv)
    result = run(args)
    bad = result["summary"]["not_done"] or result["summary"]["wrong_answers"] or result["summary"]["predict"]["not_200"]
    if not result["complete"]:
        print(f"NOT COMPLETE: requests still pending after {args.max_wait_minutes:g} minutes", flush=True)
    return 1 if bad or not result["complete"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
