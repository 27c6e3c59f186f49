"""Issue 31: the results table of README.md and docs/ is rendered from a work dir's eval.json by a
command (`unlearn report DIR`), never copied by hand. Fast: no Ray, no model."""

import json

import pytest

from ray_jobs import cli

EVAL = {
    "experiment": "demo", "date": "2026-12-07T02:10:33+00:00", "n_test": 256, "n_positive": 141,
    "config_file": "configs/demo.yaml", "config_sha256": "0123456789abcdef" * 4, "workdir": "runs/demo", "batch_size": 16,
    "machine": {"platform": "Linux-6.1-x86_64", "cpu": "AMD EPYC (AVX-512)", "cpu_count": 2, "torch": "2.13.0",
                "torch_threads": 1, "python": "3.11.9"},
    "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95},
    "methods": {
        "apa": {"auc": 0.61234, "auc_ci95": [0.5432, 0.6789], "latency_ms": 11.0, "adapters": 4,
                "notes": "K=4 semantic-user shards, lora; attention, non-decomposed merge"},
        "shard-0": {"auc": 0.58, "auc_ci95": [0.51, 0.65], "latency_ms": 10.0, "adapters": 1,
                    "notes": "APA shard 0 alone (120 training samples)"},
        "floor-history": {"auc": 0.7049, "auc_ci95": [0.6401, 0.7702], "latency_ms": None,
                          "notes": "no model: the share of liked titles in the sample's history"},
    },
    "forget_cost": {"apa": {"forget_seconds": 30.0, "full_retrain_seconds": 120.0, "ratio": 4.0, "shards": 4,
                            "shards_retrained": 1.0, "requests": 1}},
}


def test_report_renders_each_auc_with_its_interval_the_floors_the_ratios_and_the_source(tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "eval.json").write_text(json.dumps(EVAL))
    assert cli.main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| apa | 0.612 | [0.543, 0.679] | K=4 semantic-user shards" in table
    assert "| floor-history | 0.705 | [0.640, 0.770] | no model: the share of liked titles" in table
    assert "| forget one user (apa: 1 of 4 shards retrained) | 30.0 s | full train job 120.0 s | 4.00x faster |" in table
    assert "| 11.00 ms/sample | one adapter (shard-0) 10.00 ms/sample | 1.10x the time |" in table
    assert "config `configs/demo.yaml`" in table and "AMD EPYC (AVX-512), 2 CPUs, torch 2.13.0" in table
    assert "2026-12-07 02:10 UTC on 256 test samples (141 liked)" in table
    assert f"Rendered by `unlearn report {tmp_path}`" in table


def test_report_of_a_work_dir_without_an_evaluation_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path)])
    assert exit_.value.code == 2 and "no evaluation report" in capsys.readouterr().err
