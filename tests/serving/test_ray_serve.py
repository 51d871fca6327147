"""``owl2 serve --replicas N``: the same app as N Ray Serve replicas behind one endpoint, on a local Ray instance
(loopback only, no dashboard, 2 logical CPUs). Both replicas must answer, and their greedy answers must equal the
in-process reference's, plain and streamed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from owl2.serving.app import ServerSettings
from owl2.serving.replicas import ServeOptions, app, run_ray
from tests.serving.conftest import data_url, expected_answer, free_port, scene

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

CHAT = "/v1/chat/completions"
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ray_url(tiny_checkpoint) -> Iterator[str]:
    """Two replicas of the tiny checkpoint behind Ray Serve's proxy on a free loopback port."""
    saved = {key: os.environ.get(key) for key in LOCAL_ENV}
    os.environ.update(LOCAL_ENV)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=80 * 2**20, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        port = free_port()
        options = ServeOptions(model=str(tiny_checkpoint), dtype="fp32", device="cpu",
                               settings=ServerSettings(default_temperature=0.0, model_name="tiny"))
        run_ray(options, replicas=2, host="127.0.0.1", port=port, num_cpus_per_replica=0.5, blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # serve.run returns once the replicas are up; the proxy may need a moment more
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray Serve endpoint did not come up")
            time.sleep(0.2)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _question(max_tokens: int = 6, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene())}},
                                                      {"type": "text", "text": "What is in the picture?"}]}],
            "max_tokens": max_tokens, **extra}


def test_both_replicas_serve(ray_url):
    with httpx.Client(base_url=ray_url, timeout=30) as client:
        pids = set()
        for _ in range(60):
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["model"] == "tiny"
            pids.add(health.json()["pid"])
            if len(pids) == 2:
                break
    assert len(pids) == 2, f"one replica answered every request: {pids}"
    assert os.getpid() not in pids


def test_greedy_answer_plain_and_streamed(ray_url, tiny_pipeline):
    body = _question()
    expected = expected_answer(tiny_pipeline, body["messages"], body["max_tokens"])
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        response = client.post(CHAT, json=body)
        assert response.status_code == 200, response.text
        completion = response.json()
        assert completion["model"] == "tiny"
        assert completion["choices"][0]["message"]["content"] == expected

        with client.stream("POST", CHAT, json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_serve_run_builder_constructs_the_application(tiny_checkpoint):
    """``serve run owl2.serving.replicas:app model=DIR replicas=2``: the builder alone, nothing started."""
    from ray.serve import Application

    application = app({"model": str(tiny_checkpoint), "replicas": "2", "dtype": "fp32", "device": "cpu",
                       "cpus_per_replica": "0.5", "served_model_name": "tiny", "max_batch_size": "4",
                       "max_queue": "6", "default_temperature": "0"})
    assert isinstance(application, Application)
    deployment = application._bound_deployment
    assert deployment.name == "owl2" and deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.max_ongoing_requests == 4 + 6
