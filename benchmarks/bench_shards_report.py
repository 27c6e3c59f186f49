"""The K sweep's report (benchmarks/bench_shards.py): its markdown tables and its plot."""

from __future__ import annotations

from matplotlib.figure import Figure  # not pyplot: no global figure state


def _interval(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "-"


def _ratio(s: dict, name: str, key: str) -> str:
    return f"{s[key][name]:.2f}x [{s[key + '_cpu'][name]:.2f}x]"


def markdown(result: dict) -> str:
    """A line naming the machine and the config, then the costs, then serving and accuracy."""
    m, sizes, rows = result["machine"], result["sizes"], result["rows"]
    lines = [f"{m['date']}, {m['cpu']} ({'AVX-512' if m['avx512'] else 'no AVX-512'}, {m['cores']} cores), load average "
             f"{m['load_average_start'][0]:.1f} at the start; {result['config']} with n_train {sizes['n_train']}, "
             f"n_valid {sizes['n_valid']}, n_test {sizes['n_test']}, `user` partition, {sizes.get('at_once')} shard runs at once; "
             f"{result['seconds'] / 60:.0f} minutes in all",
             "", "| K | shard sizes | train wall | train compute | register K shards + publish the set | forget one user: "
             "compute / full | forget: wall / train job |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        forget = (f"{r['forget_compute_s']:.1f} / {r['shard_compute_s']:.0f} s ({r['shard_compute_s'] / r['forget_compute_s']:.0f}x less)",
                  f"{r['forget_wall_s']:.0f} / {r['wall_s']:.0f} s ({r['wall_s'] / r['forget_wall_s']:.1f}x less)")
        lines.append(f"| {r['k']} | {min(r['shard_sizes'])}-{max(r['shard_sizes'])} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} CPU-s | "
                     f"{r['register_s']:.1f} + {r['publish_s']:.1f} s | {forget[0]} | {forget[1]} |")
    lines += ["", "Serving, each against one adapter (peft) timed in the same rounds: ratio of latency at batch 1 and of "
              "time per request at batch 16 (above 1: slower), wall clock [CPU time]; replica peak RSS (one adapter's beside).",
              "", "| K | m | latency b=1: dense | sparse top-m | b=16: dense | sparse top-m | one adapter b=1, b=16 | "
              "replica RSS | test AUC dense | test AUC sparse | sparse - dense | mass left out (mean, max) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["serving"]
        one, dense, sparse = s["names"]
        accuracy = (f"{r['dense_auc']:.3f} {_interval(r['dense_interval'])} | {r['sparse_auc']:.3f} {_interval(r['sparse_interval'])} | "
                    f"{_interval(r['sparse_minus_dense'])} | {r['dropped_mean']:.3f}, {r['dropped_max']:.3f}")
        lines.append(f"| {r['k']} | {r['m']} | {_ratio(s, dense, 'latency_ratio')} | {_ratio(s, sparse, 'latency_ratio')} | "
                     f"{_ratio(s, dense, 'batch_ratio')} | {_ratio(s, sparse, 'batch_ratio')} | "
                     f"{s['latency_ms'][one]:.1f} ms, {s['throughput'][one]:.0f} req/s | {r['rss_mb']:.0f} MB ({r['rss_one_mb']:.0f}) | "
                     f"{accuracy} |")
    return "\n".join(lines)


def serving_markdown(result: dict) -> str:
    """The serving table of a --random-adapters run."""
    m, rows = result["machine"], result["rows"]
    lines = [f"{m['date']}, {m['cpu']} ({'AVX-512' if m['avx512'] else 'no AVX-512'}, {m['cores']} cores), load average "
             f"{m['load_average_start'][0]:.1f} at the start; {result['config']} with K random LoRA adapters and a synthetic "
             f"index of {result['index']}; ratios against one adapter (peft) timed in the same rounds, wall clock [CPU time]",
             "", "| K | m | latency b=1: dense | sparse top-m | b=16: dense | sparse top-m | one adapter b=1, b=16 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["serving"]
        one, dense, sparse = s["names"]
        lines.append(f"| {r['k']} | {r['m']} | {_ratio(s, dense, 'latency_ratio')} | {_ratio(s, sparse, 'latency_ratio')} | "
                     f"{_ratio(s, dense, 'batch_ratio')} | {_ratio(s, sparse, 'batch_ratio')} | "
                     f"{s['latency_ms'][one]:.0f} ms, {s['throughput'][one]:.1f} req/s |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> Figure:
    """Serving cost against one adapter, training and forgetting, and the registry, each against K."""
    ks = [r["k"] for r in rows]
    fig = Figure(figsize=(12, 3.4))
    serve, train, forget, registry = fig.subplots(1, 4)
    for label, index, key, style in (("dense b=1", 1, "latency_ratio", "o-"), ("sparse b=1", 2, "latency_ratio", "s-"),
                                     ("dense b=16", 1, "batch_ratio", "o--"), ("sparse b=16", 2, "batch_ratio", "s--")):
        serve.plot(ks, [r["serving"][key][r["serving"]["names"][index]] for r in rows], style, label=label)
    serve.axhline(1.10, color="grey", lw=0.8, ls=":")
    serve.set(title="serving: time against one adapter", xlabel="K", ylabel="ratio", xscale="log")
    serve.legend(fontsize=7)
    train.plot(ks, [r["wall_s"] for r in rows], "o-", label="wall s")
    train.plot(ks, [r["cpu_s"] for r in rows], "s-", label="CPU-s")
    train.set(title="train job", xlabel="K", xscale="log")
    train.legend(fontsize=7)
    forget.plot(ks, [r["shard_compute_s"] / r["forget_compute_s"] for r in rows], "o-", label="compute")
    forget.plot(ks, [r["wall_s"] / r["forget_wall_s"] for r in rows], "s-", label="wall")
    forget.set(title="forget one user: x less than a full train", xlabel="K", xscale="log")
    forget.legend(fontsize=7)
    registry.plot(ks, [r["register_s"] for r in rows], "o-", label="register K shard versions")
    registry.plot(ks, [r["publish_s"] for r in rows], "s-", label="publish the set")
    registry.set(title="registry (MLflow, sqlite)", xlabel="K", ylabel="s", xscale="log")
    registry.legend(fontsize=7)
    for ax in (serve, train, forget, registry):
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()  # the log axis' own labels would overlap the K values
    fig.tight_layout()
    return fig
