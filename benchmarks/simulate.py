"""The internet-scale plan, by simulation: forgetting at millions of users and thousands of requests
a day, driven by shard training costs measured on this machine (benchmarks/simulate_inputs.json).

    python -m benchmarks.simulate                      # the plan of docs/scale.md: 10M users, 10,000 requests a day
    python -m benchmarks.simulate --partition semantic-user --workers 800   # the movielens config's partition
    python -m benchmarks.simulate --shards 1024 --slices 4 --workers 500 --round-interval 3600 --days 3
    python -m benchmarks.simulate --sweep --out docs   # docs/scale.png and docs/scale-sweep.md (docs/scale.md)

A discrete-event simulation in numpy (no Ray, no model). Simulated: forget requests arrive as a
Poisson process, each naming one user, and three ways of forgetting serve them:
- product (ray_jobs/forget.py): a round takes every pending request, retrains each affected shard
  once from the earliest affected slice (incremental slices: slice r on from checkpoint r-1), and
  ends when the last shard is retrained, plus the measured round overhead (mask, delete, register,
  publish, purge). The next round starts when one ends (round interval 0: what the reconciler
  does) or at the next multiple of the interval. A user's samples share one shard (drawn in
  proportion to shard size) and one slice (a hash of the user id); shards are as unequal as the
  measured semantic-user shards (`--partition semantic-user`) or as a hash of the user id makes
  them (`user`);
- sisa: SISA as its paper unlearns: random shards and slices per sample (a user's samples spread
  over shards), cumulative slices with SISA's epoch rule (2e/(R+1) epochs a stage, so training from
  scratch costs what unsliced training does), one request per round; sisa-batched: the same
  shards and slices in the product's rounds (what SISA's slicing costs with coalescing);
- full-retrain: one model on all the data, once per round of every pending request, data-parallel
  over all the workers with perfect scaling (generous to it).
A worker trains one shard at a time, shards in id order as Ray queues them (list scheduling). A
shard's training costs fixed + per_valid * validation samples + per_sample * samples * (share of
the per-sample work redone), fitted on three measured trainings; a worker is one measured CPU
shard actor, `--worker-speedup` times faster (a GPU's factor is not measured here).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

INPUTS = Path(__file__).with_name("simulate_inputs.json")
DAY = 86400.0
MAX_REQUESTS = 2_000_000  # keeps one simulation under a minute
METHODS = ("product", "sisa", "sisa-batched", "full-retrain")
PARTITIONS = ("user", "semantic-user")
PARTITION_OF = {"sisa": "random per sample", "sisa-batched": "random per sample", "full-retrain": "none"}  # the baselines' own


@dataclass(frozen=True)
class Costs:
    """Measured inputs: seconds of one shard training on one worker and what a round adds."""

    fixed: float  # per shard training, whatever its size
    per_valid: float  # per validation sample: every shard training re-scores the validation set
    per_sample: float  # per training sample, all epochs
    round_overhead: float
    samples_per_user: float
    samples_per_user_std: float
    shard_size_cv: float  # of semantic-user shards
    valid_samples: int

    def shard_seconds(self, samples, redone=1.0, valid: int | None = None):
        valid = self.valid_samples if valid is None else valid
        return self.fixed + self.per_valid * valid + self.per_sample * np.asarray(samples) * redone


def load_costs(path: Path = INPUTS) -> Costs:
    """Fit fixed, per_valid and per_sample on the measured trainings (each row: the sum over its
    shards of fixed + per_valid * valid + per_sample * samples)."""
    inputs = json.loads(path.read_text())
    rows = inputs["shard_trainings"]
    design = np.array([[r["shards"], r["shards"] * r["valid_samples"], r["samples"]] for r in rows], float)
    fixed, per_valid, per_sample = np.linalg.lstsq(design, np.array([r["seconds"] for r in rows], float), rcond=None)[0]
    return Costs(float(fixed), float(per_valid), float(per_sample), inputs["round_overhead_seconds"]["value"],
                 inputs["samples_per_user"]["value"], inputs["samples_per_user"]["std"], inputs["shard_size_cv"]["value"],
                 inputs["valid_samples"]["value"])


def fit_checks(costs: Costs, path: Path = INPUTS) -> list[tuple[str, float, float]]:
    """Measurements the fit was not made from, against what it predicts: (what, predicted, measured)."""
    checks = json.loads(path.read_text())["checks"]
    job = checks["train_job_4096"]
    wall = makespan(costs.shard_seconds(job["shard_samples"], valid=job["valid_samples"]), job["workers"])
    forget = checks["forget_one_user"]
    redone = (forget["slices"] - np.array(forget["restart_slices"])) / forget["slices"]
    mean = float(np.mean(costs.shard_seconds(forget["shard_samples"], redone, valid=forget["valid_samples"])))
    return [("K=4 train job at 4096 samples, 2 workers, wall s", wall, job["wall_seconds"]),
            ("one-user forget, R=4, shard compute s", mean, forget["seconds"])]


@dataclass(frozen=True)
class Scenario:
    users: int = 10_000_000
    requests_per_day: float = 10_000
    partition: str = "user"  # the product's shards: "user" (a hash of the user id) or "semantic-user"
    shards: int = 16384  # K (the defaults are docs/scale.md's recommendation)
    slices: int = 1  # R
    workers: int = 600  # G: shard trainings at once
    worker_speedup: float = 1.0  # a worker's speed against the measured CPU shard actor
    days: float = 7
    round_interval: float = 0.0  # seconds; 0: a round starts when the previous one ends
    mask_cap: float = 1.0  # share of the training data a round may mask; requests past it wait
    seed: int = 0

    def problem(self, costs: Costs) -> str | None:
        """The first bad argument, named as on the command line, or None."""
        limits = [("partition", self.partition in PARTITIONS, " or ".join(PARTITIONS)),
                  ("users", self.users >= 1, "at least 1"), ("requests-per-day", self.requests_per_day > 0, "positive"),
                  ("shards", self.shards >= 1, "at least 1"), ("slices", self.slices >= 1, "at least 1"),
                  ("workers", self.workers >= 1, "at least 1"), ("worker-speedup", self.worker_speedup > 0, "positive"),
                  ("days", self.days > 0, "positive"), ("round-interval", self.round_interval >= 0, "0 or more seconds"),
                  ("mask-cap", 0 < self.mask_cap <= 1, "in (0, 1]")]
        for name, ok, rule in limits:
            if not ok:
                return f"--{name} must be {rule} (got {getattr(self, name.replace('-', '_'))})"
        if self.shards > self.users * costs.samples_per_user:
            return f"--shards {self.shards} is more than the {self.users * costs.samples_per_user:.0f} samples of --users {self.users}"
        if self.requests_per_day * self.days > MAX_REQUESTS:
            return f"--requests-per-day x --days is {self.requests_per_day * self.days:.0f} requests; at most {MAX_REQUESTS}"
        return None


@dataclass
class Plan:
    """How one method shards, slices and batches: request i's hits (its samples in one shard) are
    hit_shard / hit_slice[offsets[i]:offsets[i + 1]]."""

    sizes: np.ndarray  # samples per shard
    hit_shard: np.ndarray
    hit_slice: np.ndarray
    offsets: np.ndarray
    redone: Callable[[np.ndarray], np.ndarray]  # share of a shard's per-sample work redone from slice r
    batch_limit: int | None  # None: a round takes every pending request
    task_workers: int  # workers one shard training runs on at once


def shard_sizes(samples: float, shards: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Shard sizes summing to `samples`, lognormal with coefficient of variation `cv`."""
    weights = rng.lognormal(0.0, math.sqrt(math.log1p(cv**2)), shards) if shards > 1 else np.ones(1)
    return samples * weights / weights.sum()


def size_cv(s: Scenario, costs: Costs) -> float:
    """How unequal the product's shards are: semantic-user as measured at K=4; user (a hash of the
    user id) as a sum of about users/K users' sample counts."""
    if s.partition == "semantic-user":
        return costs.shard_size_cv
    return math.sqrt((1 + (costs.samples_per_user_std / costs.samples_per_user) ** 2) * s.shards / s.users)


def product_plan(s: Scenario, costs: Costs, n: int, rng: np.random.Generator) -> Plan:
    sizes = shard_sizes(s.users * costs.samples_per_user, s.shards, size_cv(s, costs), rng)
    shard = rng.choice(s.shards, size=n, p=sizes / sizes.sum())  # a shard's users in proportion to its samples
    return Plan(sizes, shard, rng.integers(s.slices, size=n), np.arange(n + 1),
                lambda r: (s.slices - r) / s.slices, None, 1)


def sisa_plan(s: Scenario, costs: Costs, n: int, rng: np.random.Generator, batched: bool) -> Plan:
    """Random shards and slices per sample; a user's sample count is geometric (the measured
    MovieLens counts: mean 6.33, std 6.02; a geometric of that mean has std 5.8)."""
    per_user = rng.geometric(1.0 / costs.samples_per_user, size=n)
    total = int(per_user.sum())
    sizes = np.full(s.shards, s.users * costs.samples_per_user / s.shards)
    R = s.slices
    return Plan(sizes, rng.integers(s.shards, size=total), rng.integers(R, size=total), np.r_[0, np.cumsum(per_user)],
                lambda r: 1.0 - r * (r + 1) / (R * (R + 1)), None if batched else 1, 1)


def full_retrain_plan(s: Scenario, costs: Costs, n: int) -> Plan:
    return Plan(np.array([s.users * costs.samples_per_user]), np.zeros(n, int), np.zeros(n, int), np.arange(n + 1),
                lambda r: np.ones_like(r, float), None, s.workers)


def makespan(durations: np.ndarray, workers: int) -> float:
    """Wall time of tasks taken in order by the first free worker."""
    durations = np.asarray(durations, float)
    if len(durations) <= workers:
        return float(durations.max(initial=0.0))
    free = [0.0] * workers
    for seconds in durations:
        heapq.heapreplace(free, free[0] + seconds)
    return max(free)


def round_cost(plan: Plan, s: Scenario, costs: Costs, masked_at: np.ndarray, first: int, last: int):
    """One round over requests [first, last): its wall seconds, worker-seconds, and per touched
    shard the time it was first masked and the share of it that the retrain redoes."""
    lo, hi = plan.offsets[first], plan.offsets[last]
    when = np.repeat(masked_at[first:last], np.diff(plan.offsets[first : last + 1]))
    shard, slice_ = plan.hit_shard[lo:hi], plan.hit_slice[lo:hi]
    order = np.lexsort((slice_, shard))  # by shard, then slice: a shard's first hit has its earliest slice
    shard, slice_, when = shard[order], slice_[order], when[order]
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    touched, redone = shard[starts], plan.redone(slice_[starts])
    seconds = costs.shard_seconds(plan.sizes[touched], redone) / s.worker_speedup
    wall = makespan(seconds / plan.task_workers, max(1, s.workers // plan.task_workers)) + costs.round_overhead
    return wall, float(seconds.sum()), (touched, np.minimum.reduceat(when, starts), redone)


def admitted(plan: Plan, first: int, last: int, cap: float) -> int:
    """How many of the pending requests [first, last), in arrival order, a round takes while the
    shards they mask hold at most `cap` of the training data (at least one)."""
    lo, hi = plan.offsets[first], plan.offsets[last]
    shard = plan.hit_shard[lo:hi]
    _, first_hits = np.unique(shard, return_index=True)
    share = np.zeros(hi - lo)
    share[first_hits] = plan.sizes[shard[first_hits]] / plan.sizes.sum()
    masked_after = np.cumsum(share)[plan.offsets[first + 1 : last + 1] - lo - 1]
    return max(1, int(np.searchsorted(masked_after, cap * (1 + 1e-9), side="right")))


def run_rounds(plan: Plan, s: Scenario, costs: Costs, arrivals: np.ndarray):
    """Rounds one after another until every request is done: each request's done and masked times,
    and per round (start, end, worker-seconds, touched shards). A request is masked when it arrives
    if the first round to consider it takes it, else (the mask cap) when a later round takes it."""
    done, masked_at, rounds = np.empty(len(arrivals)), arrivals.copy(), []
    waiting = np.zeros(len(arrivals), bool)
    now, first = 0.0, 0
    while first < len(arrivals):
        start = max(now, arrivals[first])
        if s.round_interval > 0:  # the first tick after the oldest pending request, or at once if it passed
            start = max(now, math.ceil(arrivals[first] / s.round_interval) * s.round_interval)
        pending = int(np.searchsorted(arrivals, start, side="right"))
        last = min(pending, first + plan.batch_limit) if plan.batch_limit else pending
        if s.mask_cap < 1:
            last = first + admitted(plan, first, last, s.mask_cap)
            masked_at[first:last] = np.where(waiting[first:last], start, masked_at[first:last])
            waiting[last:pending] = True
        wall, compute, touched = round_cost(plan, s, costs, masked_at, first, last)
        done[first:last] = start + wall
        rounds.append((start, start + wall, compute, touched))
        now, first = start + wall, last
    return done, masked_at, rounds


def served_share(plan: Plan, rounds: list, span: float) -> dict[str, tuple[float, float]]:
    """(time-averaged, worst) share of the training data served. 'masked': a touched shard serves
    nothing from its first request to its round's end (the product today); 'clean-prefix': it
    serves its last clean slice checkpoint meanwhile (issue 30, part 3), losing only what it redoes."""
    if not rounds:
        return {"masked": (1.0, 1.0), "clean-prefix": (1.0, 1.0)}
    shard = np.concatenate([r[3][0] for r in rounds])
    start = np.concatenate([r[3][1] for r in rounds])
    end = np.concatenate([np.full(len(r[3][0]), r[1]) for r in rounds])
    redone = np.concatenate([np.broadcast_to(r[3][2], r[3][0].shape) for r in rounds]).astype(float)
    order = np.argsort(shard, kind="stable")  # within a shard, rounds stay in order: starts and ends rise
    shard, start, end, redone = shard[order], start[order], end[order], redone[order]
    groups = np.flatnonzero(np.r_[True, (shard[1:] != shard[:-1]) | (start[1:] > end[:-1])])  # overlapping masks merge
    begin, finish = start[groups], np.maximum.reduceat(end, groups)
    weight = plan.sizes[shard[groups]] / plan.sizes.sum()
    lost = {"masked": weight, "clean-prefix": weight * np.maximum.reduceat(redone, groups)}
    return {mode: _served(begin, finish, w, span) for mode, w in lost.items()}


def _served(begin: np.ndarray, finish: np.ndarray, lost: np.ndarray, span: float) -> tuple[float, float]:
    times, deltas = np.r_[begin, finish], np.r_[lost, -lost]
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.clip(np.cumsum(deltas[order]), 0.0, 1.0)
    lost_time = float(np.sum(level * np.diff(np.r_[times, max(span, times[-1])])))
    return 1.0 - lost_time / span, 1.0 - float(level.max())


def simulate(s: Scenario, costs: Costs, method: str, arrivals: np.ndarray | None = None) -> dict:
    """One method on one scenario; the same seed gives every method the same arrivals."""
    rng = np.random.default_rng(s.seed)
    if arrivals is None:
        n = max(1, int(rng.poisson(s.requests_per_day * s.days)))
        arrivals = np.sort(rng.uniform(0.0, s.days * DAY, n))
    draws = np.random.default_rng([s.seed, METHODS.index(method)])
    n = len(arrivals)
    plan = {"product": lambda: product_plan(s, costs, n, draws), "sisa": lambda: sisa_plan(s, costs, n, draws, False),
            "sisa-batched": lambda: sisa_plan(s, costs, n, draws, True),
            "full-retrain": lambda: full_retrain_plan(s, costs, n)}[method]()
    done, masked_at, rounds = run_rounds(plan, s, costs, arrivals)
    wait = done - arrivals
    span = max(s.days * DAY, float(done.max()))
    compute = sum(r[2] for r in rounds)
    quarter = n // 4
    served = served_share(plan, rounds, span)
    return {
        "method": method, **asdict(s), "partition": PARTITION_OF.get(method, s.partition), "shards": len(plan.sizes),
        "slices": 1 if method == "full-retrain" else s.slices, "requests": n, "rounds": len(rounds),
        "p99_masked_s": float(np.percentile(masked_at - arrivals, 99)),
        "p50_done_h": float(np.percentile(wait, 50)) / 3600, "p99_done_h": float(np.percentile(wait, 99)) / 3600,
        "compute_per_user_h": compute / n / 3600, "cluster_share": compute / (s.workers * span),
        "shards_per_round": float(np.mean([len(r[3][0]) for r in rounds])),
        "served_mean": served["masked"][0], "served_worst": served["masked"][1],
        "served_mean_clean_prefix": served["clean-prefix"][0],
        # a queue that grows: the last quarter of requests waits much longer than the second
        "keeps_up": bool(quarter == 0 or np.median(wait[3 * quarter:]) <= 1.5 * np.median(wait[quarter : 2 * quarter])),
    }


COLUMNS = [("method", "method", "{}"), ("partition", "partition", "{}"), ("K", "shards", "{}"), ("R", "slices", "{}"),
           ("workers", "workers", "{}"), ("speedup", "worker_speedup", "{:g}x"), ("interval s", "round_interval", "{:g}"),
           ("mask cap", "mask_cap", "{:.1%}"), ("rounds", "rounds", "{}"), ("shards/round", "shards_per_round", "{:.1f}"),
           ("masked p99 s", "p99_masked_s", "{:.3g}"), ("done p50 h", "p50_done_h", "{:.2f}"), ("done p99 h", "p99_done_h", "{:.2f}"),
           ("worker-h per user", "compute_per_user_h", "{:.3g}"), ("cluster on forgetting", "cluster_share", "{:.0%}"),
           ("served (masking)", "served_mean", "{:.1%}"), ("served worst", "served_worst", "{:.1%}"),
           ("served (clean prefix)", "served_mean_clean_prefix", "{:.1%}"), ("keeps up", "keeps_up", "{}")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def describe_inputs(costs: Costs) -> str:
    lines = [(f"shard training on one worker = {costs.fixed:.1f} s + {costs.per_valid:.4f} s x validation samples "
              f"+ {costs.per_sample:.4f} s x training samples (2 epochs); round overhead {costs.round_overhead:.1f} s; "
              f"{costs.samples_per_user:.2f} samples a user; semantic-user shard sizes' CV {costs.shard_size_cv:.2f} "
              f"(inputs: {INPUTS.name})")]
    lines += [f"  check, {what}: predicted {predicted:.1f}, measured {measured:.1f}" for what, predicted, measured in fit_checks(costs)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None, costs: Costs) -> tuple[argparse.Namespace, Scenario]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.splitlines()[0])
    for field in fields(Scenario):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type={"int": int, "float": float, "str": str}[field.type],
                            default=field.default, help=f"default {field.default}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--sweep", action="store_true",
                        help="the sweeps of docs/scale.md (their own scenarios): a plot and a markdown table in --out")
    parser.add_argument("--out", default="docs", help="folder for the sweep's scale.png and scale-sweep.md (default docs)")
    args = parser.parse_args(argv)
    scenario = Scenario(**{f.name: getattr(args, f.name) for f in fields(Scenario)})
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    problem = f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}" if unknown else scenario.problem(costs)
    if problem:
        parser.error(problem)
    return args, scenario


def main(argv: list[str] | None = None) -> int:
    costs = load_costs()
    args, scenario = parse_args(argv, costs)
    print(describe_inputs(costs), flush=True)
    if args.sweep:
        from benchmarks.simulate_sweep import sweep

        sweep(costs, Path(args.out))
        return 0
    rows = [simulate(scenario, costs, method) for method in args.methods.split(",")]
    print(f"\n{scenario.users:,} users, {scenario.requests_per_day:g} requests a day for {scenario.days:g} days; "
          f"worker speedup {scenario.worker_speedup:g}x the measured CPU shard actor\n")
    print(markdown_table(rows))
    if os.environ.get("BENCH_RESULT") and "product" in args.methods.split(","):  # run by `python -m benchmarks`
        from benchmarks.common import finish

        finish("simulate", {"figures": bench_figures(rows), "rows": rows})
    return 0


def bench_figures(rows: list[dict]) -> list[dict]:
    """The product against each baseline of the same simulated scenario (`make bench`'s summary)."""
    from benchmarks.common import figure

    product = next(r for r in rows if r["method"] == "product")
    others = [r for r in rows if r["method"] != "product"]
    return ([figure("simulated worker-h per forgotten user", product["compute_per_user_h"], "worker-h", r["method"],
                    r["compute_per_user_h"], higher_is_better=False) for r in others]
            + [figure("simulated p99 time to done", product["p99_done_h"], "h", r["method"], r["p99_done_h"], higher_is_better=False)
               for r in others])


if __name__ == "__main__":
    sys.exit(main())
