"""A work dir's evaluation as the results table of README.md and docs/ (markdown, on standard output):
each AUC with its 95% interval, the no-model floors beside them, the forget and serving ratios, and
the config and machine the run came from. Reads DIR/reports/eval.json only; starts no Ray.

    python -m ray_jobs.report runs/demo            (or: unlearn report runs/demo)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.eval_report import results_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.report", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a work dir the evaluation has run in (python -m ray_jobs.evaluate)")
    args = parser.parse_args(argv)
    path = Path(args.workdir, "reports", "eval.json")
    if not path.is_file():
        parser.exit(2, f"error: {path}: no evaluation report (run `unlearn evaluate --workdir {args.workdir} ...` first)\n")
    print(results_table(json.loads(path.read_text()), f"unlearn report {args.workdir}"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
