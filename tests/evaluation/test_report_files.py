"""The report files hold whatever the data and the metrics bring: strict JSON with an undefined metric, Markdown
tables whose names contain ``|`` or line breaks, and a plot whose category names contain ``$``."""

from __future__ import annotations

import json
import math

import pytest

from owl2.evaluation import get_task
from owl2.evaluation.harness import write_report
from owl2.evaluation.report import markdown_report, plot_breakdown
from owl2.evaluation.tasks.base import TaskReport


def strict_json(text: str):
    def reject(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def test_an_undefined_metric_is_null_in_strict_json(tmp_path):
    report = TaskReport({"srcc": math.nan, "plcc": math.inf, "n": 3}, {"cat": {"srcc": -math.inf, "acc": 1.5}})
    paths = write_report(get_task("vqav2"), report, tmp_path, num_samples=3)
    payload = strict_json(paths[0].read_text())
    assert payload["metrics"] == {"srcc": None, "plcc": None, "n": 3}
    assert payload["breakdown"] == {"cat": {"srcc": None, "acc": 1.5}}
    assert "| srcc | nan |" in paths[1].read_text()


def test_names_with_pipes_and_line_breaks_stay_in_their_cells():
    report = TaskReport({"acc|top1": 50.0}, {"yes|no\nquestions": {"accuracy": 50.0}, "plain": {"accuracy": 25.0}})
    text = markdown_report("t", report, 2, {"prompt": "line one\nline two | more"})
    lines = text.splitlines()
    assert "2 samples; prompt line one line two \\| more" in lines
    assert "| acc\\|top1 | 50.00 |" in lines
    assert "| yes\\|no questions | 50.00 |" in lines and "| plain | 25.00 |" in lines


def test_dollar_signs_in_category_names_are_drawn_as_text(tmp_path):
    pytest.importorskip("matplotlib")
    report = TaskReport({"accuracy": 40.0}, {"a $x^{$ b": {"accuracy": 50.0}, "costs $5": {"accuracy": 30.0}},
                        plot_metric="accuracy")
    assert plot_breakdown("t", report, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
