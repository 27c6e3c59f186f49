"""Issue 31: the `unlearn` console script that pip installs (pyproject [project.scripts]) runs the
jobs with their own arguments and exit codes. Fast: no Ray starts; the script itself runs where it
imports nothing heavy, its commands run in this process (a job module takes seconds to import)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs import cli

from .conftest import ROOT, TINY

SCRIPT = Path(sys.executable).parent / "unlearn"


def unlearn(*args: str) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: `pip install -e .` (make setup) installs it"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_help_names_every_command_and_a_command_takes_its_module_arguments(capsys):
    out = unlearn("--help")
    assert out.returncode == 0, out.stderr
    for command in ("train", "forget", "evaluate", "serve", "status", "report"):
        assert f"  {command} " in out.stdout
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0 and "--exclude-file" in capsys.readouterr().out  # ray_jobs.train's own parser


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    out = unlearn("bogus")
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "error: config file not found" in capsys.readouterr().err  # the module's own exit 2


def test_status_of_a_work_dir_that_holds_nothing_yet(tmp_path, capsys):
    assert cli.main(["status", "--config", str(TINY), "--workdir", str(tmp_path / "none")]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["exists"] is False and status["trained"] is None and status["requests"] == {}
    assert not (tmp_path / "none").exists()  # read-only: nothing written


def test_every_name_of_the_documented_api_resolves():
    import components

    assert components.__all__ and all(getattr(components, name) is not None for name in components.__all__)
