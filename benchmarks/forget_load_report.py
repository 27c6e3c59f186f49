"""The figures and the table of benchmarks/bench_forget_load.py: answers checked against the
documented ones, latencies, rounds, predict under load, and the served share over time."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import figure, limit
from components.store import Workdir

if TYPE_CHECKING:
    from benchmarks.bench_forget_load import Post


def wrong_answers(posts: list[Post]) -> list[str]:
    """Every post whose answer is not the documented one."""
    wrong = []
    for post in posts:
        if post.kind == "malformed":
            ok = post.status == post.expected and post.message in post.answer.get("detail", "")
        elif post.kind == "again":
            ok = post.status in (200, 202) and post.answer.get("request_id") == post.request_id and \
                (post.status == 200) == (post.answer.get("state") == "done")
        else:
            ok = post.status == 202 and post.answer.get("request_id") == post.request_id and \
                (post.kind != "unknown" or post.answer.get("affected_shards") == [])
        if not ok:
            wrong.append(f"{post.kind} {post.request_id or post.message}: {post.status} {json.dumps(post.answer)[:200]}")
    return wrong


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "max": float(max(values))}


def rounds_of(workdir: Workdir, ids: list[str]) -> list[dict]:
    """The forget rounds that carried the requests (from their audit records), in the order they ended."""
    rounds = {}
    for rid in ids:
        path = workdir.path("audit", f"{rid}.json")
        if path.exists() and "round_id" in (audit := json.loads(path.read_text())):  # a failed request's has none
            entry = rounds.setdefault(audit["round_id"], {"round_id": audit["round_id"], "requests": 0,
                                                          "shards_retrained": len(audit["affected_shards"]),
                                                          "deferred_shards": audit.get("deferred_shards", []),
                                                          "seconds": round(sum(audit["seconds"].values()), 1),
                                                          "ended": path.stat().st_mtime})
            entry["requests"] += 1
    return sorted(rounds.values(), key=lambda r: r["ended"])


def served_share_series(health: list[dict], t0: float, end: float) -> dict:
    """The served share from the first post until every request was done: its minimum, its mean over
    time, the share of that time with some data masked, and one sample every 30 s."""
    window = [h for h in health if t0 <= h["t"] <= end]
    if not window:
        return {"samples": 0}
    shares = np.array([h["served_share"] for h in window])
    times = np.array([h["t"] for h in window] + [end])
    spans = np.diff(times)
    series, next_at = [], t0
    for h in window:
        if h["t"] >= next_at:
            series.append({"t_s": round(h["t"] - t0), "served_share": h["served_share"], "masked_shards": h["masked_shards"],
                           "pending": h["pending"]})
            next_at = h["t"] + 30
    return {"samples": len(window), "min": float(shares.min()), "time_weighted_mean": float((shares * spans).sum() / spans.sum()),
            "time_below_1_share": float(spans[shares < 1].sum() / spans.sum()), "max_masked_share": max(h["masked_share"] for h in window),
            "every_30s": series}


def figures_of(summary: dict) -> list[dict]:
    """The figures for `python -m benchmarks`: targets where issue 30 sets one."""
    at_once, waited, done = summary["masked_at_once_s"], summary["masked_after_waiting_s"], summary["done_s"]
    predict, share = summary["predict"], summary["served_share"]
    figures = [
        limit("time to masked p99, masked at once (the 202)", at_once.get("p99", float("inf")), "s", 1.0,
              "its p50", at_once.get("p50", 0)),
        figure("time to done p99", done.get("p99", float("inf")), "s", f"time to done p50 ({done.get('n', 0)} requests)",
               done.get("p50", 0), higher_is_better=False),
        figure("predict p99 during the load", predict["load"].get("p99", float("inf")) * 1000, "ms", "predict p99 idle",
               predict["idle"].get("p99", 0) * 1000, higher_is_better=False),
        limit("predict answers other than 200 during the load", predict["not_200"], "", 1, "predict calls", predict["load"].get("n", 0)),
        figure("served share of the training data, minimum during the rounds", share.get("min", 0), "", "idle (every shard served)", 1.0),
        limit("accepted requests not done (lost or failed)", len(summary["not_done"]), "", 1, "accepted requests", summary["accepted"]),
        limit("answers other than documented", len(summary["wrong_answers"]), "", 1, "posts", summary["posts"]),
    ]
    if waited.get("n"):
        figures.insert(1, figure(f"time to masked p99 of the {waited['n']} requests that waited for a round (the bound)",
                                 waited["p99"], "s", "masked at once p99", at_once.get("p99", 0), higher_is_better=False))
    return figures


def summarize(posts: list[Post], timings: dict, not_done: list[str], rounds: list[dict], predicts: list, health: list,
              t0: float, end: float) -> dict:
    """Latencies, rounds, predict figures and the served share of one run; `predicts` are (sent at, seconds,
    status) of the predict loop, `health` the /healthz samples."""
    masked = [t for t in timings.values() if t["shards"]]
    idle = [lat for at, lat, _ in predicts if at < t0]
    load = [(lat, code) for at, lat, code in predicts if t0 <= at <= end]
    codes = {}
    for _, code in load:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {
        "posts": len(posts), "accepted": len(timings), "kinds": {k: sum(p.kind == k for p in posts) for k in
                                                                 ("new", "second", "again", "unknown", "malformed")},
        "posting_seconds": max(p.answered for p in posts) - t0, "wrong_answers": wrong_answers(posts), "not_done": not_done,
        "answer_s": percentiles([p.answered - p.sent for p in posts]),
        "masked_at_once_s": percentiles([t["answer_s"] for t in masked if not t["waited"]]),
        "masked_after_waiting_s": percentiles([t["masked_s"] for t in masked if t["waited"] and t["masked_s"] is not None]),
        "done_s": percentiles([t["done_s"] for t in timings.values() if t["done_s"] is not None]),
        "rounds": rounds, "shard_retrains_per_round": [r["shards_retrained"] for r in rounds],
        "predict": {"idle": percentiles(idle), "load": percentiles([lat for lat, _ in load]), "status_counts": codes,
                    "not_200": sum(code != 200 for _, code in load)},
        "served_share": served_share_series(health, t0, end), "until_all_done_s": end - t0,
    }


def markdown(result: dict) -> str:
    """A short table of the run for docs/results.md."""
    s, m = result["summary"], result["machine"]
    ms = lambda p, k: f"{p[k] * 1000:.0f} ms" if k in p else "-"  # noqa: E731
    sec = lambda p: f"{p['p50']:.1f} / {p['p99']:.1f} / {p['max']:.1f} s" if p.get("n") else "-"  # noqa: E731
    share = s["served_share"]
    rows = [
        ("requests posted (new / second / same id again / unknown / malformed)",
         f"{s['posts']} ({' / '.join(str(s['kinds'][k]) for k in ('new', 'second', 'again', 'unknown', 'malformed'))}) "
         f"in {s['posting_seconds']:.0f} s"),
        ("accepted requests done / not done", f"{s['accepted'] - len(s['not_done'])} / {len(s['not_done'])} "
                                             + (f"(all done {s['until_all_done_s']:.0f} s after the first post)" if result["complete"]
                                                else f"(when the wait ended, {s['until_all_done_s']:.0f} s after the first post)")),
        ("answers other than documented", str(len(s["wrong_answers"]))),
        ("rounds; shard retrains per round", f"{len(s['rounds'])}; {s['shard_retrains_per_round']}"),
        ("time to masked, masked at once (p50 / p99 / max)", sec(s["masked_at_once_s"])),
        ("time to masked, waited for a round: forget.max_masked_share (p50 / p99 / max)",
         sec(s["masked_after_waiting_s"]) + f" ({s['masked_after_waiting_s']['n']} requests)"),
        ("time to done (p50 / p99 / max)", sec(s["done_s"])),
        ("predict p99 idle / during the load", f"{ms(s['predict']['idle'], 'p99')} / {ms(s['predict']['load'], 'p99')}"),
        ("predict statuses during the load", json.dumps(s["predict"]["status_counts"])),
        ("served share of the training data: min / time-weighted mean / time below 1",
         f"{share.get('min', 0):.2f} / {share.get('time_weighted_mean', 0):.2f} / {share.get('time_below_1_share', 0):.0%}"),
    ]
    head = (f"{m['date']}, {m['cpu']} ({'AVX-512' if m['avx512'] else 'no AVX-512'}, {m['cores']} cores), load average "
            f"{m['load_average'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end; {result['setup']}")
    return "\n".join([head, "", "| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])
