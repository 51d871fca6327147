"""One app, one or many processes: :func:`build_app` for a single server, :func:`ray_application` for N replicas of
the same app behind one Ray Serve endpoint (each replica loads the model and runs its own continuous batcher; Ray's
proxy spreads requests over them).

Single machine: ``owl2 serve --replicas 2``. A cluster: start Ray on every node (``ray start --head`` on one,
``ray start --address HEAD:6379`` on the others), then ``owl2 serve --ray-address auto --replicas 8
--gpus-per-replica 1`` on the head; Ray places one replica per GPU. The same deployment can be run with
``serve run owl2.serving.replicas:app model=/path replicas=4``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.serving.app import ServerSettings

APP_NAME = "owl2"


@dataclass
class ServeOptions:
    """What a process needs to build the app: where the model is, how to load it, and the server settings."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    policy: str | None = None
    adapter: str | None = None
    quantize: str | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)


def served_model_name(model: str | None) -> str:
    """The model id clients send by default: the checkpoint directory's name (``owl2-tiny`` for the default)."""
    return "owl2-tiny" if model is None else Path(model.rstrip("/")).name or model


def build_app(options: ServeOptions) -> Any:
    """Load the model and return the FastAPI app (what each process or replica runs)."""
    from owl2.api import load
    from owl2.serving.app import create_app

    pipeline = load(options.model, dtype=options.dtype, device=options.device, policy=options.policy,
                    adapter=options.adapter, quantize=options.quantize, show_progress=False)
    return create_app(pipeline, options.settings)


def ray_application(options: ServeOptions, *, replicas: int = 2, num_cpus_per_replica: float = 1.0,
                    num_gpus_per_replica: float = 0.0) -> Any:
    """A Ray Serve application: ``replicas`` copies of :func:`build_app`'s app behind one HTTP route."""
    from ray import serve

    def build() -> Any:  # runs inside each replica
        return build_app(options)

    replica_class = serve.ingress(build)(type("Owl2Replica", (), {"__doc__": "One owl2 server replica."}))
    deployment = serve.deployment(replica_class, name=APP_NAME, num_replicas=replicas,
                                  max_ongoing_requests=options.settings.max_batch_size + options.settings.max_queue,
                                  ray_actor_options={"num_cpus": num_cpus_per_replica,
                                                     "num_gpus": num_gpus_per_replica})
    return deployment.bind()


def run_ray(options: ServeOptions, *, replicas: int, host: str, port: int, address: str | None = None,
            num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0, blocking: bool = True) -> None:
    """Start (or join) Ray, serve :func:`ray_application` at ``http://host:port/``.

    ``blocking``: wait until Ctrl-C or SIGTERM, then stop the app (and the Ray instance this call started). Without
    it, return once the replicas are up; the caller owns ``serve.shutdown()`` and ``ray.shutdown()``.
    """
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # its own "No module named 'ray'" does not say which extra brings it
        raise ImportError("Ray Serve replicas need ray[serve], which is not installed (pip install 'owl2[ray]')"
                          ) from exc

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token file
    started_ray = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = ray_application(options, replicas=replicas, num_cpus_per_replica=num_cpus_per_replica,
                          num_gpus_per_replica=num_gpus_per_replica)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)  # returns once every replica is up
    print(f"serving {options.settings.model_name} on {replicas} Ray Serve replica(s) at http://{host}:{port}/v1",
          flush=True)
    if not blocking:
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the Ray Serve replicas ...", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started_ray:  # our own local instance: take all of it down
            serve.shutdown()
            ray.shutdown()
        else:  # a shared cluster: remove only this app, leave Serve and other apps running
            serve.delete(APP_NAME)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def app(args: dict[str, str]) -> Any:
    """``serve run owl2.serving.replicas:app model=... replicas=N`` (Ray Serve's application builder).

    Keys (all optional, strings as ``serve run`` passes them): model, dtype, device, policy, served_model_name,
    max_batch_size, max_queue, max_new_tokens, default_temperature, replicas, cpus_per_replica, gpus_per_replica.
    """
    defaults = ServerSettings()
    settings = ServerSettings(
        model_name=args.get("served_model_name") or served_model_name(args.get("model")),
        max_batch_size=int(args.get("max_batch_size", defaults.max_batch_size)),
        max_queue=int(args.get("max_queue", defaults.max_queue)),
        max_new_tokens=int(args.get("max_new_tokens", defaults.max_new_tokens)),
        default_temperature=float(args.get("default_temperature", defaults.default_temperature)))
    options = ServeOptions(model=args.get("model"), dtype=args.get("dtype"), device=args.get("device"),
                           policy=args.get("policy"), settings=settings)
    return ray_application(options, replicas=int(args.get("replicas", 2)),
                           num_cpus_per_replica=float(args.get("cpus_per_replica", 1)),
                           num_gpus_per_replica=float(args.get("gpus_per_replica", 0)))
