"""The predictions cache (``<output>/<task>.predictions.jsonl``) after a kill or damage: a torn last line (even one
cut inside a UTF-8 character) or a malformed line is dropped with one warning, the file is rewritten without it,
and only those samples run again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from owl2.evaluation import evaluate, read_predictions
from tests.evaluation.test_tasks import vqa_jsonl

TORN = b'{"id": "3", "prediction": "caf' + "é".encode()[:1]  # cut inside the two bytes of "é"


def cache(out: Path, name: str, content: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.predictions.jsonl"
    path.write_bytes(content)
    return path


def line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "owl2.evaluation" and r.levelno == logging.WARNING]


def test_a_torn_utf8_tail_is_dropped_and_the_rerun_completes(tmp_path, tiny_pipeline, caplog):
    data = vqa_jsonl(tmp_path / "data")
    kept = [{"id": "1", "prediction": "rouge écarlate"}, {"id": "2", "prediction": "deux"}]
    path = cache(tmp_path / "out", "vqav2", b"".join(map(line, kept)) + TORN)

    with caplog.at_level(logging.WARNING, logger="owl2.evaluation"):
        result = evaluate(tiny_pipeline, "vqav2", data, tmp_path / "out", show_progress=False)
    assert result.ran == 1  # only the sample whose line was torn
    [warning] = warnings_of(caplog)
    assert warning == (f"{path}: kept 2 cached prediction(s); dropped the torn last line (a run killed while writing "
                       "it); those samples run again")
    # The file was rewritten before the append: every line is whole, the kept ones unchanged, nothing glued.
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert [json.loads(x) for x in lines[:2]] == kept and len(lines) == 3
    assert json.loads(lines[2])["id"] == "3" and path.read_bytes().endswith(b"\n")
    assert set(read_predictions(path)) == {"1", "2", "3"}


def test_a_record_without_a_prediction_runs_again(tmp_path, tiny_pipeline, caplog):
    data = vqa_jsonl(tmp_path / "data")
    path = cache(tmp_path / "out", "vqav2", line({"id": "1", "prediction": "red"}) + line({"id": "2"})
                 + line({"id": "3", "prediction": "no"}))
    with caplog.at_level(logging.WARNING, logger="owl2.evaluation"):
        result = evaluate(tiny_pipeline, "vqav2", data, tmp_path / "out", show_progress=False)
    assert result.ran == 1 and "accuracy" in result.report.metrics
    assert warnings_of(caplog) == [f"{path}: kept 2 cached prediction(s); dropped line 2 (no prediction); those "
                                   "samples run again"]
    assert {k: "prediction" in v for k, v in read_predictions(path).items()} == {"1": True, "2": True, "3": True}


def test_malformed_lines_are_dropped_with_their_line_numbers(tmp_path, caplog):
    content = b"".join([
        line({"id": "a", "prediction": "yes"}),
        b"{not json\n",
        b"\n",  # a blank line is no record and no problem
        b"[1, 2]\n",
        line({"id": "b", "prediction": None}),
        line({"id": True, "prediction": "x"}),
        b'{"id": "c", "prediction": "\xff"}\n',
        line({"id": 7, "prediction": 3.5}),
        b'{"id": "d", "prediction": "last line without a newline"}',  # complete: kept
    ])
    path = cache(tmp_path, "t", content)
    with caplog.at_level(logging.WARNING, logger="owl2.evaluation"):
        found = read_predictions(path)
    assert set(found) == {"a", "7", "d"} and found["7"]["prediction"] == 3.5
    assert warnings_of(caplog) == [
        f"{path}: kept 3 cached prediction(s); dropped line 2 (not valid JSON), line 4 (a JSON list, not an object), "
        "line 5 (prediction is not text), line 6 (no id), line 7 (not UTF-8); those samples run again"]


def test_the_mode_decides_the_prediction_type(tmp_path, caplog):
    path = cache(tmp_path, "iqa", line({"id": "a", "prediction": 3.25, "probs": [0.2] * 5, "std": 0.1})
                 + line({"id": "b", "prediction": "good"}))
    with caplog.at_level(logging.WARNING, logger="owl2.evaluation"):
        assert set(read_predictions(path, mode="rate")) == {"a"}
        assert set(read_predictions(path, mode="generate")) == {"b"}
    assert [m.split("; ")[1] for m in warnings_of(caplog)] == ["dropped line 2 (prediction is not a number)",
                                                               "dropped line 1 (prediction is not text)"]


def test_many_bad_lines_make_one_warning_line(tmp_path, caplog):
    path = cache(tmp_path, "t", b"oops\n" * 40 + line({"id": "a", "prediction": "ok"}))
    with caplog.at_level(logging.WARNING, logger="owl2.evaluation"):
        assert set(read_predictions(path)) == {"a"}
    [warning] = warnings_of(caplog)
    assert "\n" not in warning and warning.endswith("line 5 (not valid JSON) and 35 more; those samples run again")


def test_rescoring_without_a_model_names_what_is_missing(tmp_path):
    data = vqa_jsonl(tmp_path / "data")
    path = cache(tmp_path / "out", "vqav2", line({"id": "1", "prediction": "red"}) + TORN)
    with pytest.raises(ValueError, match=r"^vqav2: 2 of 3 samples have no usable prediction in .*vqav2\.predictions"):
        evaluate(None, "vqav2", data, tmp_path / "out", show_progress=False)
    assert path.read_bytes().endswith(TORN)  # nothing was rewritten by a run that could not run
