"""Issue 31: the `unlearn` console script that pip installs (pyproject [project.scripts]) runs the
jobs with their own arguments and exit codes. Fast: no Ray starts."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, TINY

SCRIPT = Path(sys.executable).parent / "unlearn"


def unlearn(*args: str) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: `pip install -e .` (make setup) installs it"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_help_names_every_command_and_a_command_takes_its_module_arguments():
    out = unlearn("--help")
    assert out.returncode == 0, out.stderr
    for command in ("train", "forget", "evaluate", "serve", "status", "report"):
        assert f"  {command} " in out.stdout
    out = unlearn("train", "--help")
    assert out.returncode == 0 and "--exclude-file" in out.stdout  # ray_jobs.train's own parser


def test_bad_input_exits_2_with_a_message(tmp_path):
    out = unlearn("bogus")
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr
    out = unlearn("status", "--config", str(tmp_path / "missing.yaml"))  # the module's own exit 2
    assert out.returncode == 2 and "error: config file not found" in out.stderr


def test_status_of_a_work_dir_that_holds_nothing_yet(tmp_path):
    out = unlearn("status", "--config", str(TINY), "--workdir", str(tmp_path / "none"))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["exists"] is False and status["trained"] is None and status["requests"] == {}
    assert not (tmp_path / "none").exists()  # read-only: nothing written


def test_every_name_of_the_documented_api_resolves():
    import components

    assert components.__all__ and all(getattr(components, name) is not None for name in components.__all__)
