"""`unlearn`: one command for the jobs, installed with the package (pyproject [project.scripts]).

    unlearn train    --config FILE [--workdir DIR] ...   python -m ray_jobs.train
    unlearn forget   --config FILE ...                   python -m ray_jobs.forget
    unlearn evaluate --config FILE ...                   python -m ray_jobs.evaluate
    unlearn serve    --config FILE ...                   python -m serving
    unlearn status   --config FILE [--workdir DIR]       python -m ray_jobs.status
    unlearn report   DIR                                 python -m ray_jobs.report

Each command takes the module's own arguments and exits with its code (2 on bad input);
`unlearn COMMAND --help` shows them. A command's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "train": ("ray_jobs.train", "train one adapter per shard, register them, publish an adapter set"),
    "forget": ("ray_jobs.forget", "forget users or interactions exactly, and prove it"),
    "evaluate": ("ray_jobs.evaluate", "evaluate APA, its variants and the baselines on the test split"),
    "serve": ("serving.__main__", "serve the live adapter set over HTTP (Ray Serve)"),
    "status": ("ray_jobs.status", "show what a work dir holds: store, adapter sets, forget requests, reports"),
    "report": ("ray_jobs.report", "render a work dir's evaluation as the results table (markdown)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unlearn", description="Exact unlearning for LLM recommenders: train, forget, evaluate, serve.",
        epilog="commands:\n" + "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (unlearn COMMAND --help)")
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args.args)


if __name__ == "__main__":
    raise SystemExit(main())
