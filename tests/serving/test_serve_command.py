"""What a new user meets with ``owl2 serve``: the embedded model says what it knows (in the log and on the chat
page, which also gets the example scene), and --replicas without Ray is one line, not a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from owl2.api import EMBEDDED_EXAMPLE_QUESTIONS, EMBEDDED_MODEL_NOTICE
from owl2.serving.app import EMBEDDED_PAGE_NOTICE, EXAMPLE_SCENE_PATH, create_app
from tests.serving.conftest import ROOT, ServerProcess, start_server

EXAMPLE = ROOT / "examples" / "scene.png"


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    process = start_server(None, log=log)
    yield process, log
    process.stop()


def test_the_embedded_model_says_what_it_knows(embedded_server):
    server, log = embedded_server
    text = log.read_text()
    notice = EMBEDDED_MODEL_NOTICE.replace("pass --model", "serve it with --model")
    assert text.count(notice) == 1, text
    assert "serve it with --model ./owl2-7b" in notice
    page = httpx.get(server.url + "/", timeout=30).text
    assert "owl2-tiny" in page and EMBEDDED_PAGE_NOTICE in page
    for question in EMBEDDED_EXAMPLE_QUESTIONS:
        assert question in page
    scene = httpx.get(server.url + EXAMPLE_SCENE_PATH, timeout=30)
    assert scene.status_code == 200 and scene.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(scene.content)).convert("RGB").tobytes() == (
        Image.open(EXAMPLE).convert("RGB").tobytes())  # the README's scene, drawn by the package itself


def test_another_model_has_no_example_scene(tiny_pipeline):
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_pipeline)) as client:
        response = client.get(EXAMPLE_SCENE_PATH)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
        page = client.get("/").text
    assert EMBEDDED_PAGE_NOTICE not in page and '{"examples": null}' in page


def test_replicas_without_ray_is_one_line():
    """Ray made unimportable in the child (a ``None`` in ``sys.modules`` is what Python treats as not installed)."""
    script = ("import sys; sys.modules['ray'] = None; sys.modules['ray.serve'] = None; "
              "from owl2.cli.main import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, "serve", "--replicas", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("owl2 serve: error: --replicas 2 runs the copies on Ray Serve (pip install 'owl2[ray]'), "
                           "which is not installed\n")
