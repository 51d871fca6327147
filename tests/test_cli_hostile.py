"""The command line under odd arguments: each mistake is one line on stderr naming it, with exit code 2, never a
traceback, and is found before the model loads where the arguments alone show it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from owl2.cli.main import main
from tests.conftest import in_thread


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, command: str = "ask") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith(f"owl2 {command}: error: "), err
    assert "Traceback" not in err and len(lines) == 1, f"more than the error line (the model was loaded?): {err}"
    return lines[-1]


@pytest.mark.parametrize(("record", "words"), [
    ({"prompt": "hi", "images": 5}, '"images" must be a list'),
    ({"prompt": "hi", "images": {"a.png": 1}}, '"images" must be a list'),
    ({"prompt": "hi", "images": [["a.png"]]}, "an image must be a path or URL"),
    ({"prompt": "hi", "images": ["a.png", None]}, "an image must be a path or URL"),
    ({"prompt": "hi", "image": 5}, "an image must be a path or URL"),
    ({"prompt": "hi", "image": {"path": "a.png"}}, "an image must be a path or URL"),
], ids=["images a number", "images an object", "images nested", "images holding null", "image a number",
        "image an object"])
def test_ask_jsonl_lines_of_the_wrong_shape_are_one_line_errors(tmp_path: Path, capsys, record, words):
    """``"images": 5`` (or null) raised TypeError out of a list comprehension: a traceback with exit code 1."""
    lines = tmp_path / "questions.jsonl"
    lines.write_text(json.dumps({"prompt": "fine", "images": []}) + "\n" + json.dumps(record) + "\n",
                     encoding="utf-8")
    message = _one_line_error(capsys, main(["ask", "--jsonl", str(lines)]))
    assert f"{lines} line 2: " in message and words in message, message


def test_ask_jsonl_a_directory_is_a_one_line_error(tmp_path: Path, capsys):
    message = _one_line_error(capsys, main(["ask", "--jsonl", str(tmp_path)]))
    assert "is a directory" in message, message


def _main_within(argv: list[str], timeout: float = 30.0) -> int:
    """``main(argv)``, which must return within ``timeout`` seconds (a server that starts instead fails the test)."""
    return in_thread(lambda: main(argv), timeout)


def test_serve_refuses_what_it_cannot_listen_on_before_loading(tmp_path: Path, capsys):
    """A port out of range hung after the model loaded; a port in use or a host name that does not resolve was
    uvicorn's log lines and exit code 3; a --allowed-local-media that is no directory served anyway."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--port", "99999"], "--port must be 0 to 65535"),
                 (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
                 (["--allowed-local-media", str(tmp_path / "missing")], "not a directory")]
        for flags, words in cases:
            message = _one_line_error(capsys, _main_within(["serve", *flags]), "serve")
            assert words in message, message


def test_rate_output_that_is_a_fifo_is_refused_not_replaced(tmp_path: Path, capsys):
    """The atomic rewrite of --output replaced a FIFO by a plain file and reported success."""
    fifo = tmp_path / "ratings.jsonl"
    os.mkfifo(fifo)
    image = tmp_path / "a.png"
    image.write_bytes(b"not read: the output is checked first")
    message = _one_line_error(capsys, _main_within(["rate", "--output", str(fifo), str(image)]), "rate")
    assert "not a regular file" in message, message
    assert fifo.is_fifo()


def test_eval_refuses_bad_arguments_before_loading(tmp_path: Path, capsys):
    """--limit -1 sliced the last sample off and evaluated the rest (minutes, on a real set); a FIFO as --data waited
    for a writer for ever; a file as --output was '[Errno 17] File exists'."""
    fifo = tmp_path / "questions.jsonl"
    os.mkfifo(fifo)
    taken = tmp_path / "report.txt"
    taken.write_text("mine", encoding="utf-8")
    data = ["--data", str(tmp_path)]
    for flags, words in [([*data, "--limit", "-1"], "--limit must be at least 1, got -1"),
                         ([*data, "--limit", "0"], "--limit must be at least 1, got 0"),
                         ([*data, "--batch-size", "0"], "--batch-size must be at least 1"),
                         (["--data", str(fifo)], "not a regular file or directory"),
                         ([*data, "--output", str(taken)], "exists and is not a directory")]:
        message = _one_line_error(capsys, _main_within(["eval", "--task", "shapes", *flags]), "eval")
        assert words in message, message
    assert taken.read_text(encoding="utf-8") == "mine"


def test_train_refuses_fifos_as_data_or_recipe(tmp_path: Path, capsys):
    """``data.path`` naming a FIFO hung the run while reading it; a FIFO as the recipe was "no recipe file"."""
    fifo = tmp_path / "train.json"
    os.mkfifo(fifo)
    code = _main_within(["train", "lora", f"data.path={json.dumps(str(fifo))}", "train.max_steps=1"], timeout=120)
    err = capsys.readouterr().err
    assert code == 2 and "not a regular file" in err and "Traceback" not in err, err
    message = _one_line_error(capsys, _main_within(["train", str(fifo)]), "train")
    assert "is not a regular file" in message, message
