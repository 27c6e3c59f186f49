"""The sweeps behind docs/scale.md: `python -m benchmarks.simulate --sweep --out docs` writes
scale.png (six panels) and scale-sweep.md (every row of the panels).

All at 10M users and 10,000 requests a day for 7 days, seed 0, on workers that each run one shard
training at the measured CPU speed unless a row says otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchmarks.simulate import Costs, Scenario, markdown_table, simulate

SHARDS = (1024, 4096, 8192, 16384, 32768, 65536)
UNBOUNDED = 10**6  # workers enough that no shard training ever waits: the K sweep sees K alone
BASE = Scenario(days=7, workers=UNBOUNDED)
RECOMMENDED = Scenario()  # its defaults: docs/scale.md says why
WORKERS = (350, 400, 450, 500, 600, 800, 1200)
SPEEDUPS = (1.0, 30.0, 300.0)
MASK_CAPS = (1.0, 0.03, 0.025, 0.02, 0.015)
# (label, method, what differs from BASE): the lines of the K panels
LINES = [("product R=1", "product", {}), ("product R=4", "product", {"slices": 4}),
         ("product R=1, semantic-user shards", "product", {"partition": "semantic-user"}),
         ("product R=1, daily rounds", "product", {"round_interval": 86400}),
         ("SISA R=4, one request a round", "sisa", {"slices": 4}), ("SISA R=4, coalesced rounds", "sisa-batched", {"slices": 4})]
BASELINES = [("full retrain, continuous rounds", 0), ("full retrain, daily rounds", 86400)]


def k_sweep(costs: Costs) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    lines = {label: [simulate(replace(BASE, shards=k, **changes), costs, method) for k in SHARDS] for label, method, changes in LINES}
    # the whole model retrains data-parallel over the recommended cluster: unbounded workers would make it free
    baselines = {label: simulate(replace(RECOMMENDED, round_interval=interval), costs, "full-retrain") for label, interval in BASELINES}
    return lines, baselines


def worker_sweep(costs: Costs) -> list[dict]:
    return [simulate(replace(RECOMMENDED, workers=g), costs, "product") for g in WORKERS]


def cap_sweep(costs: Costs) -> list[dict]:
    """Time to masked against served coverage: a round masks at most a share of the data."""
    return [simulate(replace(RECOMMENDED, mask_cap=cap), costs, "product") for cap in MASK_CAPS]


def speed_sweep(costs: Costs) -> list[dict]:
    """What faster workers (GPUs, whose speed is not measured here) change: durations shrink by the
    speedup, so fewer, larger shards keep the same coverage."""
    return [simulate(replace(BASE, shards=k, worker_speedup=speed), costs, "product") for speed in SPEEDUPS for k in SHARDS]


def plot(lines: dict, baselines: dict, workers: list[dict], caps: list[dict], speeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    panels = [("compute_per_user_h", "worker-hours per forgotten user", 1), ("p99_done_h", "p99 time to done (hours)", 1),
              ("served_mean", "% of the training data served (time average)", 100)]
    for ax, (key, title, scale) in zip(axes[0], panels):
        for label, rows in lines.items():
            ax.plot(SHARDS, [row[key] * scale for row in rows], marker="o", label=label)
        for label, row in baselines.items():
            ax.axhline(row[key] * scale, linestyle="--", color="grey" if "daily" in label else "black",
                       label=f"{label} ({row['workers']} workers)")
        ax.set(xscale="log", yscale="log" if scale == 1 else "linear", xlabel="shards K", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][2].plot(SHARDS, [row["served_mean_clean_prefix"] * 100 for row in lines["product R=4"]], marker="x", linestyle=":",
                    label="product R=4, serving clean prefixes")
    axes[0][0].legend(fontsize=7)
    axes[0][2].legend(fontsize=7, loc="lower right")
    _workers_panel(axes[1][0], workers)
    _cap_panel(axes[1][1], caps)
    ax = axes[1][2]
    for speed in SPEEDUPS:
        ax.plot(SHARDS, [r["served_mean"] * 100 for r in speeds if r["worker_speedup"] == speed], marker="o", label=f"workers {speed:g}x")
    ax.set(xscale="log", xlabel="shards K", title="% served (time average), product R=1, by worker speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("10M users, 10,000 forget requests a day "
                 "(simulated; shard costs measured on a 2-core AVX-512 EPYC, 1x = one of its cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _workers_panel(ax, workers: list[dict]) -> None:
    x = [r["workers"] for r in workers]
    ax.plot(x, [r["p99_done_h"] for r in workers], marker="o", label="p99 time to done (h)")
    ax.plot(x, [r["cluster_share"] * 100 for r in workers], marker="s", label="% of the cluster on forgetting")
    ax.plot(x, [r["served_mean"] * 100 for r in workers], marker="^", label="% of the data served")
    ax.set(xlabel="workers G", title=f"product K={RECOMMENDED.shards}, R={RECOMMENDED.slices}, continuous rounds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _cap_panel(ax, caps: list[dict]) -> None:
    x = range(len(caps))  # caps close together: one tick each
    ax.plot(x, [r["served_mean"] * 100 for r in caps], marker="o", label="% served, time average")
    ax.plot(x, [r["served_worst"] * 100 for r in caps], marker="v", label="% served, worst instant")
    ax.set(xticks=list(x), xticklabels=[f"{r['mask_cap']:.1%}" + ("" if r["keeps_up"] else "\nfalls behind") for r in caps],
           xlabel="mask cap: share of the data a round may mask", ylabel="% served",
           title=f"time to masked against coverage (K={RECOMMENDED.shards}, {RECOMMENDED.workers} workers)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, [r["p99_masked_s"] / 3600 for r in caps], marker="s", color="red", label="p99 time to masked (h)")
    twin.set_ylabel("p99 time to masked (hours)", color="red")


def sweep(costs: Costs, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines, baselines = k_sweep(costs)
    workers, caps, speeds = worker_sweep(costs), cap_sweep(costs), speed_sweep(costs)
    sections = [("Shards K, workers unbounded (full retrain: the recommended cluster)",
                 [row for rows in lines.values() for row in rows] + list(baselines.values())),
                (f"Workers G at K={RECOMMENDED.shards}, R={RECOMMENDED.slices}", workers),
                (f"Mask cap at K={RECOMMENDED.shards}, R={RECOMMENDED.slices}, {RECOMMENDED.workers} workers", caps),
                ("Worker speed (a GPU's is not measured here), workers unbounded", speeds)]
    text = ["# The simulator's sweeps (generated by `python -m benchmarks.simulate --sweep --out docs`)", "",
            "10M users, 10,000 requests a day for 7 days, seed 0; docs/scale.md has the model and its inputs.", ""]
    for title, rows in sections:
        text += [f"## {title}", "", markdown_table(rows), ""]
    (out / "scale-sweep.md").write_text("\n".join(text))
    plot(lines, baselines, workers, caps, speeds, out / "scale.png")
    print("\n\n".join(f"## {title}\n\n{markdown_table(rows)}" for title, rows in sections))
    print(f"\nwrote {out / 'scale-sweep.md'} and {out / 'scale.png'}")
