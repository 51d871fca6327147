"""``owl2 serve``: the OpenAI-compatible server (uvicorn), or ``--replicas N`` copies behind Ray Serve."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

from owl2.cli import ADAPTER_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP


def settings_from_args(args: argparse.Namespace) -> Any:
    from owl2.serving.app import ServerSettings
    from owl2.serving.images import ImagePolicy
    from owl2.serving.replicas import served_model_name

    for flag, value in (("--max-body-mb", args.max_body_mb), ("--body-timeout", args.body_timeout),
                        ("--header-timeout", args.header_timeout), ("--keep-alive-timeout", args.keep_alive_timeout),
                        ("--max-header-kb", args.max_header_kb)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value:g}")
    if args.max_connections < 0:
        raise ValueError(f"--max-connections must be 0 (no cap) or more, got {args.max_connections}")
    if args.allowed_local_media is not None and not Path(args.allowed_local_media).is_dir():
        raise ValueError(f"--allowed-local-media {args.allowed_local_media}: not a directory")
    keys = list(args.api_key or [])
    if os.environ.get("OWL2_API_KEY"):
        keys.append(os.environ["OWL2_API_KEY"])
    images = ImagePolicy(max_pixels=args.max_image_pixels, max_aspect_ratio=args.max_image_aspect_ratio,
                         allowed_local_dir=None if args.allowed_local_media is None else Path(args.allowed_local_media),
                         allow_remote=args.allow_remote_images, remote_timeout=args.remote_timeout,
                         remote_max_bytes=int(args.remote_max_mb * 2**20), max_downloads=args.max_image_downloads,
                         allow_private_hosts=args.allow_private_image_hosts,
                         allowed_networks=tuple(args.allow_image_network or ()))
    return ServerSettings(
        model_name=args.served_model_name or served_model_name(args.model), api_keys=tuple(keys),
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_images_per_request=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20), body_timeout=args.body_timeout,
        header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
        max_header_bytes=int(args.max_header_kb * 1024),
        max_connections=None if args.max_connections == 0 else args.max_connections, images=images,
        lenient=args.lenient,
        default_temperature=args.default_temperature, max_rate_items=args.max_rate_items,
        max_video_frames=args.max_video_frames, prefill_rows=args.prefill_rows, prefill_tokens=args.prefill_tokens,
        max_rate_queue=args.max_rate_queue, prefix_cache_mb=args.prefix_cache_mb)


def _missing(module: str, why: str) -> None:
    """ValueError (one line from ``owl2``, exit 2) when the optional ``module`` cannot be imported."""
    try:
        __import__(module)
    except ImportError:
        raise ValueError(f"{why}, which is not installed") from None


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` for uvicorn to listen on, bound before the model loads so that a port in
    use, a host name that does not resolve or a port out of range is a one-line ValueError at once (uvicorn would
    report it after the load, in its log, with an exit code of its own)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"--host {host!r}: not an address of this machine ({getattr(exc, 'strerror', exc)})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old ones linger
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _serve(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    ray = args.replicas > 1 or args.ray_address
    if ray:
        _missing("ray.serve", f"--replicas {args.replicas} runs the copies on Ray Serve (pip install 'owl2[ray]')"
                 if args.replicas > 1 else "--ray-address joins a Ray cluster with Ray Serve (pip install 'owl2[ray]')")
    _missing("fastapi", "owl2 serve needs the serve extra (pip install 'owl2[serve]'): fastapi")
    _missing("uvicorn", "owl2 serve needs the serve extra (pip install 'owl2[serve]'): uvicorn")
    from owl2.serving.replicas import ServeOptions, build_app, run_ray

    options = ServeOptions(model=args.model, dtype=args.dtype, device=args.device, policy=args.policy,
                           adapter=args.adapter, quantize=args.quantize, settings=settings_from_args(args))
    url = f"http://{args.host}:{args.port}"
    if ray:
        if args.model is None:  # the replicas load the embedded model; the driver only says so
            from owl2.api import EMBEDDED_MODEL_NOTICE

            print(EMBEDDED_MODEL_NOTICE.replace("pass --model", "serve it with --model"), file=sys.stderr, flush=True)
        run_ray(options, replicas=args.replicas, host=args.host, port=args.port, address=args.ray_address,
                num_cpus_per_replica=args.cpus_per_replica, num_gpus_per_replica=args.gpus_per_replica)
        return 0
    import uvicorn

    from owl2.serving.connection import uvicorn_config

    with listen(args.host, args.port) as sock:
        print(f"loading {args.model or 'owl2-tiny (the embedded default)'} ...", file=sys.stderr, flush=True)
        app = build_app(options)
        if app.state.server.pipeline.is_embedded:
            from owl2.api import EMBEDDED_MODEL_NOTICE

            print(EMBEDDED_MODEL_NOTICE.replace("pass --model", "serve it with --model"), file=sys.stderr,
                  flush=True)
        print(f"serving {options.settings.model_name} at {url}/v1 (chat page: {url}/)", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level)).run(
            sockets=[sock])
    return 0


def register(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
        description="Serve POST /v1/chat/completions (streaming included), POST /v1/rate (Q-Align-family ratings), "
        "GET /v1/models, /health, /metrics and a chat page at /. Needs the serve extra (pip install owl2[serve]).")
    serve.add_argument("--model", default=None,
                       help="checkpoint directory or hub id (default: the embedded owl2-tiny)")
    serve.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16")
    serve.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    serve.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    serve.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    serve.add_argument("--policy", choices=["crop", "pad", "stretch"], default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    serve.add_argument("--api-key", action="append",
                       help="require 'Authorization: Bearer KEY' (repeat for several; also $OWL2_API_KEY)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height per image")
    serve.add_argument("--max-image-aspect-ratio", type=float, default=100.0,
                       help="long side over short side per image (thin strips blow up in preprocessing)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length")
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="request body size (413 over it)")
    serve.add_argument("--body-timeout", type=float, default=60.0,
                       help="seconds from the headers for the whole request body to arrive (408 after)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds from the connection (or a kept-alive request's first byte) for the request "
                       "line and headers (408 after)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0,
                       help="seconds an idle kept-alive connection stays open")
    serve.add_argument("--max-header-kb", type=float, default=16.0,
                       help="request line and headers together (431 over it)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="open connections (or requests in flight) before a request gets 503; 0: no cap")
    serve.add_argument("--allowed-local-media", default=None, metavar="DIR",
                       help="allow file:// image URLs under DIR")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve.add_argument("--remote-timeout", type=float, default=10.0,
                       help="seconds for a whole image download (lookup, connect, redirects and body together)")
    serve.add_argument("--remote-max-mb", type=float, default=20.0, help="size cap per downloaded image")
    serve.add_argument("--max-image-downloads", type=int, default=8,
                       help="image downloads in flight at once, all requests together; one more gets 429")
    serve.add_argument("--allow-private-image-hosts", action="store_true",
                       help="let image URLs reach loopback, private, link-local and other non-public addresses "
                       "(refused by default: the server must not be a way into its own network)")
    serve.add_argument("--allow-image-network", action="append", metavar="CIDR",
                       help="a non-public network image URLs may reach, e.g. 10.1.2.0/24 (repeat for several)")
    serve.add_argument("--lenient", action="store_true", help="ignore unknown request fields instead of 400")
    serve.add_argument("--default-temperature", type=float, default=1.0,
                       help="temperature of requests that give none (OpenAI's default: 1)")
    serve.add_argument("--max-rate-items", type=int, default=64, help="images or videos per /v1/rate request")
    serve.add_argument("--max-video-frames", type=int, default=16, help="frames per video item of /v1/rate")
    serve.add_argument("--prefill-rows", type=int, default=16,
                       help="rating items per batched prefill (one such prefill runs between two decode steps)")
    serve.add_argument("--prefill-tokens", type=int, default=4096,
                       help="positions per batched rating prefill: items x the longest item's prompt, images "
                       "counted as their visual tokens")
    serve.add_argument("--max-rate-queue", type=int, default=1024,
                       help="images (video frames count one each) of ratings waiting before 429")
    serve.add_argument("--prefix-cache-mb", type=float, default=512.0,
                       help="memory for the keys and values of finished prompts and answers, reused by requests "
                       "that start the same way (a chat's next turn, the same image and prompt start); 0: off")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--replicas", type=int, default=1, help="N > 1: N copies behind one endpoint (Ray Serve)")
    serve.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. 'auto') instead of starting a local one")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0)
    serve.add_argument("--gpus-per-replica", type=float, default=0.0)
    serve.set_defaults(handler=_serve)
