"""benchmarks/report.py, the one CSV and markdown writer: a result's files say how they were made."""

import csv

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


def test_write_result_heads_the_markdown_with_the_environment_and_names_the_csv(report, tmp_path):
    env = {"command": "python benchmarks/x.py --smoke", "git commit": "abc1234", "machine": "some CPU"}
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}]
    report.write_result(tmp_path / "out", "x", "Title", env, ["body line", ""], {"x.csv": rows, "x_more.csv": rows},
                        {"x_more.csv": ["c", "a"]}, header=["- runs: 2"])
    lines = (tmp_path / "out" / "x.md").read_text().splitlines()
    assert lines == ["# Title", "", "- command: `python benchmarks/x.py --smoke`", "- git commit: abc1234",
                     "- machine: some CPU", "- runs: 2", "- CSV: `x.csv`, `x_more.csv` (in this folder)", "",
                     "body line"]
    with open(tmp_path / "out" / "x.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"a": "1", "b": "0.5", "c": ""}, {"a": "2", "b": "", "c": "x"}]
    with open(tmp_path / "out" / "x_more.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["c", "a"]


def test_findings_are_appended_except_in_smoke_runs(report, tmp_path):
    (tmp_path / "x_findings.md").write_text("What it shows.\n")
    report.write_result(tmp_path, "x", "T", {"command": "c"}, ["body", ""], {}, smoke=True)
    assert "What it shows." not in (tmp_path / "x.md").read_text()
    report.write_result(tmp_path, "x", "T", {"command": "c"}, ["body", ""], {})
    text = (tmp_path / "x.md").read_text()
    assert text.endswith("## What this shows\n\nWhat it shows.\n") and "- CSV" not in text


def test_strings_are_cells_as_given_and_floats_are_rounded(report):
    table = report.markdown_table([{"a": "1.2340", "b": 1.23456, "c": None}], [("a", "A"), ("b", "B"), ("c", "C")])
    assert table == ["| A | B | C |", "|---|---|---|", "| 1.2340 | 1.235 |  |"]


def test_no_script_writes_csv_or_markdown_itself():
    """Every results file goes through report.py (so it carries the environment record)."""
    for script in BENCHMARKS.glob("*.py"):
        if script.name == "report.py":
            continue
        text = script.read_text()
        assert "import csv" not in text and "DictWriter" not in text, script.name
        assert '.md").write_text' not in text and ".md').write_text" not in text, script.name
