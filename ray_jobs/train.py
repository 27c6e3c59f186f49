"""Train every shard's adapter at once (a Ray Train run per shard), register them, publish an adapter set.

    python -m ray_jobs.train --config configs/tiny.yaml --workdir runs/tiny
    python -m ray_jobs.train ... --exclude-file subject.json  # as if they never existed: {"users": [...], "interactions": [...]}
    python -m ray_jobs.train ... --baseline retrain         # also one adapter on all the data
"""

from __future__ import annotations

import json

from components.baselines import baseline_config
from components.registry import RegistryConflict
from components.store import Workdir
from ray_jobs.common import SharedStorageError, delete_subject, fail, job_parser, load_job, read_subject
from ray_jobs.orchestration import train_workdir as run  # the job's work, as tests and the demo call it


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("ray_jobs.train", "Train one adapter per shard in parallel Ray actors and register them in MLflow.")
    parser.add_argument("--exclude-file", metavar="FILE",
                        help='train as if these never existed: JSON {"users": [...], "interactions": ["USER:ITEM", ...]}, '
                             "deleted once read; - reads standard input. A reference, in its own registry")
    parser.add_argument("--baseline", choices=["retrain"], help="also train the single-adapter baseline")
    args, config, workdir = load_job(parser, argv, builds_store=True)
    users, interactions = read_subject(args.exclude_file, "--exclude-file") if args.exclude_file else ([], [])
    bad = [i for i in interactions if i.count(":") != 1]
    if bad:
        fail(f"--exclude-file: interactions are USER:ITEM pairs, one is not (entry {interactions.index(bad[0]) + 1})")
    if args.exclude_file and workdir.path("reports", "train.json").exists():
        fail(f"{workdir.root} is already trained: forget with `python -m ray_jobs.forget` (which purges what the data "
             "touched); --exclude-file builds a from-scratch reference in a new work dir")
    if args.exclude_file:
        delete_subject(args.exclude_file)
    try:
        report = run(config, workdir, users, interactions)
    except (RegistryConflict, SharedStorageError) as err:
        fail(str(err))
    print(json.dumps({k: v for k, v in report.items() if k != "shards"}))
    if args.baseline == "retrain":
        baseline = run(baseline_config(config, "retrain"), Workdir(workdir.path("baselines", "retrain")),
                       users, interactions, states_from=workdir)
        print(f"retrain baseline: {baseline['seconds']}s (sharded: {report['seconds']}s)")
    print(f"report: {workdir.path('reports', 'train.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
