"""The evaluation's report as text: the comparison table with its intervals, the paired
differences, the verdict against the no-model floors, the forget cost, and each row's note."""

from __future__ import annotations

import math
import re

from components.config import Config
from components.train import learning_rate


def floor_verdict(report: dict) -> str:
    """One plain sentence: does one adapter on all the data beat both no-model floors?"""
    methods = report["methods"]
    if "retrain" not in methods:
        return "Retrain against the no-model floors: retrain was not evaluated in this run."
    floors = [f for f in ("floor-history", "floor-item") if f in methods]
    retrain = methods["retrain"]["auc"]
    against = " and ".join(f"{f} {_fmt(methods[f]['auc'])}" for f in floors)
    if len(floors) < 2:
        return f"Retrain against the no-model floors: only {against} could be computed ({report['floors_skipped']})."
    above = [f for f in floors if retrain > methods[f]["auc"]]
    clear = [f for f in floors if (p := report["paired"].get(f"retrain - {f}")) and p["ci95"] and p["ci95"][0] > 0]
    verdict = "yes" if len(above) == len(floors) else "no"
    return (f"**Does retrain beat both no-model floors? {verdict}.** Retrain AUC {_fmt(retrain)} against {against}"
            + (f", below {' and '.join(f for f in floors if f not in above)}" if verdict == "no" else "")
            + f". Beyond the noise (the paired 95% interval of retrain - floor above 0): {len(clear)} of {len(floors)} floors.")


def apa_note(config: Config, name: str, shards: int, forgets: int) -> str:
    merge = {"apa": "attention, non-decomposed merge", "apa-decomposed": "attention, decomposed merge",
             "uniform": "uniform parameter averaging"}[name]
    agg = config.aggregate
    sparse = (f"; sparse: top {agg.top_m or shards} adapters" + (f" up to weight mass {agg.weight_mass:g}" if agg.weight_mass else "")
              if agg.sparse else "")
    attention = f" (tau {agg.tau:g}, {agg.neighbours} neighbours{sparse})" if name != "uniform" else ""
    note = f"K={shards} {config.partition.method} shards, {config.adapter.kind}; {merge}{attention}"
    return note + (f"; after {forgets} forget request(s) in its work dir" if forgets else "")


def baseline_note(config: Config, name: str, shards: int, report: dict, forgets: int) -> str:
    samples = sum(s["samples"] for s in report["shards"].values())
    if name == "retrain":
        note = f"1 {config.adapter.kind} adapter on all {samples} training samples"
    elif name == "lmeraser":
        note = (f"K={shards} adaptive clusters, prompt tuning ({config.adapter.num_virtual_tokens} tokens, "
                f"lr {learning_rate(config):g}), routing to the nearest prototype")
    else:
        note = f"K={shards} {config.partition.method}-based shards, average of the K models' P(yes)"
    return note + (f"; after {forgets} forget request(s) in its work dir" if forgets else "")


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _fmt_interval(bounds, signed: bool = False, digits: int = 4) -> str:
    if not bounds:
        return "n/a"
    sign = "+" if signed else ""
    return f"[{bounds[0]:{sign}.{digits}f}, {bounds[1]:{sign}.{digits}f}]"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Evaluation: {report['experiment']}",
        "",
        f"- date: {report['date']}",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPU(s), torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s) per scoring worker, Python {machine['python']}",
        f"- config: {report['config_file'] or '(in-process)'}"
        + (f" (file sha256 {report['config_file_sha256']})" if report["config_file_sha256"] else "")
        + f"; resolved config sha256 {report['config_sha256']}",
        f"- test split: {report['n_test']} samples, {report['n_positive']} positive; latency = wall time of "
        f"`components.aggregate.predict` per sample, measured inside the Ray Data scoring worker, median over batches "
        f"of {report['batch_size']} after each worker's warm-up batch",
        f"- work dir: {report['workdir']}; MLflow run {report['mlflow_run_id']} (\"evaluate\")",
        f"- intervals: 95% percentile bootstrap over the test samples, {report['bootstrap']['resamples']} resamples "
        f"(seed {report['bootstrap']['seed']}), the same resamples for every method",
        "",
        "| method | AUC | 95% interval | latency (ms/sample) | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | {_fmt(row['auc'])} | {_fmt_interval(row['auc_ci95'])} | "
                     f"{_fmt(row['latency_ms'], 2)} | {row['notes']} |")
    lines += ["", floor_verdict(report)]
    if report["paired"]:
        lines += ["", "## Paired differences (same resampled test samples)", "",
                  "| difference | AUC difference | 95% interval | n |", "|---|---:|---:|---:|"]
        for name, pair in report["paired"].items():
            lines.append(f"| {name} | {pair['difference']:+.4f} | {_fmt_interval(pair['ci95'], signed=True)} | {pair['n']} |")
    if report["forget_cost"]:
        lines += [
            "",
            "## Forgetting one user against the full retrain",
            "",
            "| partition | forget (s) | full train job (s) | speedup | vs retrain baseline | shards retrained | source |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, cost in report["forget_cost"].items():
            lines.append(
                f"| {name} | {_fmt(cost['forget_seconds'], 1)} | {_fmt(cost['full_retrain_seconds'], 1)} | "
                f"{_fmt(cost['ratio'], 2)}x | {_fmt(cost.get('ratio_vs_retrain_baseline'), 2)}"
                f"{'x' if cost.get('ratio_vs_retrain_baseline') else ''} | "
                f"{cost['shards_retrained']:g} of {cost['shards']} | {cost['source']} |")
    return "\n".join(lines) + "\n"


# --- the results table (README, docs, the demo's ending): `unlearn report DIR` --------------------

ONE_ADAPTER = re.compile(r"shard-\d+|retrain")  # rows that serve a single adapter: what APA's latency is held against


def results_table(report: dict, source: str) -> str:
    """A work dir's evaluation as one markdown block: where it came from (config, machine, date),
    every AUC with its 95% interval, the no-model floors as rows beside them, then what forgetting
    one user cost against the full train job and what APA's one-pass mixture costs against a single
    adapter. `source`: the command that rendered it, named under the table."""
    machine, methods = report["machine"], report["methods"]
    config = report["config_file"] or "(in-process config)"
    lines = [
        f"**{report['experiment']}**, evaluated {report['date'][:16].replace('T', ' ')} UTC on {report['n_test']} test samples "
        f"({report['n_positive']} liked); config `{config}` (resolved sha256 {report['config_sha256'][:12]}); "
        f"{machine.get('cpu', machine['platform'])}, {machine['cpu_count']} CPUs, torch {machine['torch']}.",
        "",
        "| method | AUC | 95% interval | what it is |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {name} | {_fmt(row['auc'], 3)} | {_fmt_interval(row['auc_ci95'], digits=3)} | {row['notes']} |"
              for name, row in methods.items()]
    costs = _cost_rows(report)
    if costs:
        lines += ["", "| cost | measured | against | ratio |", "|---|---:|---:|---:|", *costs]
    lines += ["", f"Rendered by `{source}` from {report['workdir']}/reports/eval.json; 95% intervals: percentile bootstrap "
                  f"over the test samples ({report['bootstrap']['resamples']} resamples)."]
    return "\n".join(lines) + "\n"


def _cost_rows(report: dict) -> list[str]:
    rows = []
    for name, cost in report["forget_cost"].items():
        if name == "retrain" or not cost.get("forget_seconds"):
            continue  # retrain's forgetting is its full training: no ratio to show
        rows.append(f"| forget one user ({name}: {cost['shards_retrained']:g} of {cost['shards']} shards retrained) | "
                    f"{cost['forget_seconds']:.1f} s | full train job {cost['full_retrain_seconds']:.1f} s | "
                    f"{_fmt(cost['ratio'], 2)}x faster |")
    methods = report["methods"]
    single = next((m for m in methods if ONE_ADAPTER.fullmatch(m) and methods[m].get("latency_ms")), None)
    if "apa" in methods and single and methods["apa"].get("latency_ms"):
        apa, one = methods["apa"]["latency_ms"], methods[single]["latency_ms"]
        rows.append(f"| serving: APA, {methods['apa'].get('adapters', 'K')} adapters mixed in one forward pass "
                    f"(batch {report['batch_size']}) | {apa:.2f} ms/sample | one adapter ({single}) {one:.2f} ms/sample | "
                    f"{apa / one:.2f}x the time |")
    return rows
