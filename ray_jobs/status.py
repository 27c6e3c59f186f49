"""What a work dir holds, read-only: the sample store, the trained adapter set, the live set and
masked shards in its registry, forget requests by state, a round in progress, audits, baselines and
the last evaluation. Starts no Ray; asks the registry only where the work dir has one.

    python -m ray_jobs.status --config configs/tiny.yaml --workdir runs/tiny     (or: unlearn status ...)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from components.config import Config, ConfigError, load_config
from components.data import SPLITS
from components.store import Workdir
from components.unlearn import all_requests, current_round, round_holder
from ray_jobs.common import job_parser


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def registry_status(config: Config, workdir: Workdir) -> dict | None:
    """The live adapter-set version and masked shards, where the work dir has a registry to ask
    (a work dir without its sqlite store has none: asking would create one)."""
    from components.registry import Registry, default_tracking_uri

    uri = default_tracking_uri(workdir.root)
    if uri.startswith("sqlite:") and not workdir.path("mlflow.db").exists():
        return None
    masked, live, pins = Registry(config.experiment, workdir.root).mask_and_live_set()
    return {"tracking_uri": uri, "live_adapter_set": live, "masked_shards": sorted(masked),
            "shard_versions": {str(k): v for k, v in sorted((pins or {}).items())}}


def status(config: Config, workdir: Workdir) -> dict:
    import pyarrow.parquet as pq

    trained, evaluation = _json(workdir.path("reports", "train.json")), _json(workdir.path("reports", "eval.json"))
    requests = all_requests(workdir)
    round_ = current_round(workdir)
    return {
        "workdir": str(workdir.root), "experiment": config.experiment, "exists": workdir.root.is_dir(),
        "samples": {name: pq.ParquetFile(workdir.split(name)).metadata.num_rows
                    for name in SPLITS if workdir.split(name).exists()},
        "trained": trained and {"adapter_set_version": trained["adapter_set_version"], "seconds": trained["seconds"],
                                "shards": {k: v["samples"] for k, v in trained["shards"].items()}},
        "registry": registry_status(config, workdir) if workdir.root.is_dir() else None,
        "requests": dict(Counter(r["state"] for r in requests)),
        "open_requests": {r["request_id"]: r["state"] for r in requests if r["state"] != "done"},
        "round": round_ and {k: round_.get(k) for k in ("round_id", "state", "failed", "request_ids")},
        "round_held_by": round_holder(workdir) if round_ else None,
        "audits": len(list(workdir.path("audit").glob("*.json"))),
        "baselines": sorted(p.name for p in workdir.path("baselines").glob("*") if p.joinpath("reports", "train.json").exists()),
        "evaluation": evaluation and {m: {"auc": round(r["auc"], 4), "ci95": r.get("auc_ci95")}  # floors are rows too
                                      for m, r in evaluation["methods"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("ray_jobs.status", "Show what a work dir holds: store, adapter sets, forget requests, reports.")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    workdir = Workdir(Path(args.workdir or Path("runs") / config.experiment))
    print(json.dumps(status(config, workdir), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
