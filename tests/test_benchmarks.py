"""The benchmark runner: each family writes a results file the docs can render, and the figures
in it are the ones it printed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

REQUIRED = {"name", "family", "command", "commit", "dirty", "date", "machine", "seeds", "seconds", "tables"}


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_perf_run_writes_its_command_machine_and_table(tmp_path):
    done = run_benchmark("perf", "estimate", "--examples", "3000", "--groups", "12", "--subsets", "40", "--dim", "16",
                         "--check", "5", "--sklearn-fits", "2", "--results", str(tmp_path), "--name", "small")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "small.json").read_text())
    assert REQUIRED <= set(data)
    assert data["command"].startswith("python -m benchmarks perf estimate --examples 3000")
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    (row,) = data["tables"]["estimate"]["rows"]
    assert row["rows"] == 3000 and row["seconds"] > 0
    assert row["difference"] < 1e-6  # the group-level estimates equal the row-by-row ones
    assert f"| 3,000 | {row['seconds']:.2f} |" in done.stdout  # what it printed is what it wrote


def test_the_selection_family_ranks_the_demo_groups_from_a_finished_build(demo_build, tmp_path):
    recipe, _, manifest = demo_build
    cache = tmp_path / "cache"
    shutil.copytree(recipe.run_dir, cache / "runs" / "demo-tiny" / "run")  # the stages it would build, finished
    done = run_benchmark("selection", "--setting", "demo", "--ranks", "--methods", "group_effect",
                         "--cache", str(cache), "--results", str(tmp_path), "--name", "ranks")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "ranks.json").read_text())
    rows = data["tables"]["ranks:demo"]["rows"]
    assert [r["rank"] for r in rows] == list(range(1, len(manifest["groups"]) + 1))
    assert {r["group"] for r in rows} == {g["group"] for g in manifest["groups"]}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["group"].startswith(("lexicon", "unlabeled"))  # a helpful group first
    assert rows[-1]["group"].startswith(("wrong_", "unlabeled"))  # a corrupted one last


@pytest.mark.parametrize("argv", [["selection", "--setting", "t0", "--targets", "nope"],
                                  ["selection", "--size-matched", "forward", "--methods", "all"]])
def test_bad_benchmark_arguments_fail_before_any_work(argv, tmp_path):
    done = run_benchmark(*argv, "--results", str(tmp_path), "--cache", str(tmp_path / "cache"))
    assert done.returncode != 0 and not list(tmp_path.glob("*.json"))
