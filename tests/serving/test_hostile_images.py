"""Hostile images and hostile image hosts: real HTTP servers on loopback that drip, redirect into the server's own
network, send endless or wrong bodies, and images built to blow up preprocessing. Every one must end in a clear 4xx
within the download deadline, without reaching a non-public address and without holding up other requests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import os
import pickle
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from owl2.processing.image import ImageError
from owl2.serving import images as images_module
from owl2.serving.app import ServerSettings, create_app
from owl2.serving.images import ImagePolicy, TooManyDownloads, fetch_image
from tests.conftest import in_thread
from tests.serving.conftest import data_url, png_bytes, scene, serve_in_thread

CHAT = "/v1/chat/completions"
RATE = "/v1/rate"
ORANGE = png_bytes(scene("orange"))
NOT_PUBLIC = "is not a public address"
COULD_NOT_FETCH = "could not fetch the image"


class _Host(http.server.BaseHTTPRequestHandler):
    """A hostile image host. ``/redirect?to=URL`` answers 302 to URL; the other paths are named for what they do."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        with contextlib.suppress(OSError):  # the client gave up on us, as it should
            if path == "/ok.png":
                self._send(200, ORANGE)
            elif path == "/redirect":
                target = urllib.parse.parse_qs(query)["to"][0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/drip":  # a valid start, then one byte every 0.1 s of a 50 kB body
                self.send_response(200)
                self.send_header("Content-Length", "50000")
                self.end_headers()
                self.wfile.write(ORANGE[:16])
                while True:
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/drip-headers":  # never finishes its headers
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while True:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/endless":  # no Content-Length, zeros until the client hangs up
                self.send_response(200)
                self.end_headers()
                while True:
                    self.wfile.write(b"\x00" * 65536)
            elif path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
            elif path == "/html":
                self._send(200, b"<html><body>404 not found, but with status 200</body></html>", "text/html")
            else:
                self._send(404, b"no such image")

    def _send(self, status: int, body: bytes, kind: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def hostile_host(address: str = "127.0.0.1", port: int = 0) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer((address, port), _Host)
    server.daemon_threads = True
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def redirect(server: http.server.ThreadingHTTPServer, target: str) -> str:
    return f"{base(server)}/redirect?to={urllib.parse.quote(target, safe='')}"


def timed_fetch(url: str, policy: ImagePolicy, limit: float = 10.0) -> tuple[BaseException | Image.Image, float]:
    """fetch_image with a time limit (so that a regression fails the test instead of hanging it), and its seconds."""
    started = time.monotonic()
    return in_thread(lambda: fetch_image(url, policy), limit), time.monotonic() - started


def refused(url: str, policy: ImagePolicy) -> str:
    outcome, seconds = timed_fetch(url, policy)
    assert isinstance(outcome, ImageError), f"{url} was fetched: {outcome!r}"
    assert seconds < 2.0, f"refusing {url} took {seconds:.2f} s"
    return str(outcome)


def loopback_alias_available() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


needs_alias = pytest.mark.skipif(not loopback_alias_available(), reason="127.0.0.2 cannot be bound here")
REMOTE = ImagePolicy(allow_remote=True, remote_timeout=1.0)


# ------------------------------------------------------------------------------------------------ private hosts
def test_non_public_hosts_are_refused_by_default() -> None:
    with hostile_host() as host:
        port = host.server_address[1]
        urls = [f"http://127.0.0.1:{port}/ok.png", f"http://127.1:{port}/ok.png", f"http://2130706433:{port}/ok.png",
                f"http://0x7f.1:{port}/ok.png", f"http://[::1]:{port}/ok.png", f"http://0.0.0.0:{port}/ok.png",
                f"http://localhost:{port}/ok.png", f"http://LocalHost:{port}/ok.png",
                f"http://[::ffff:127.0.0.1]:{port}/ok.png", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/a.png", "http://192.168.1.1/a.png", "http://172.16.0.1/a.png",
                "http://100.64.0.1/a.png", "http://224.0.0.1/a.png", "http://[fe80::1]/a.png", "http://[fc00::1]/a.png",
                "https://127.0.0.1/a.png"]
        for url in urls:
            message = refused(url, REMOTE)
            assert NOT_PUBLIC in message and "--allow-private-image-hosts" in message, (url, message)
        assert "credentials" in refused(f"http://user@127.0.0.1:{port}/ok.png", REMOTE)
        assert "credentials" in refused(f"http://user:pw@127.0.0.1:{port}/ok.png", REMOTE)
        assert host.hits == []  # not one request reached the host


def test_the_private_hosts_flag_allows_them() -> None:
    with hostile_host() as host:
        port = host.server_address[1]
        policy = ImagePolicy(allow_remote=True, allow_private_hosts=True, remote_timeout=2.0)
        for url in (f"http://127.0.0.1:{port}/ok.png", f"http://127.1:{port}/ok.png",
                    f"http://localhost:{port}/ok.png"):
            outcome, _ = timed_fetch(url, policy)
            assert isinstance(outcome, Image.Image) and outcome.getpixel((14, 14)) == scene("orange").getpixel((14, 14))


@needs_alias
def test_every_redirect_hop_is_checked() -> None:
    """The first host is allowed (an allowed network); each redirect to a non-public address is refused."""
    with hostile_host("127.0.0.2") as allowed, hostile_host("127.0.0.1") as inside:
        policy = ImagePolicy(allow_remote=True, allowed_networks=("127.0.0.2/32",), remote_timeout=1.0)
        outcome, _ = timed_fetch(redirect(allowed, base(allowed) + "/ok.png"), policy)
        assert isinstance(outcome, Image.Image)  # the allowed host itself works, redirects included
        port = inside.server_address[1]
        for target in (f"http://127.0.0.1:{port}/ok.png", f"http://127.1:{port}/ok.png",
                       f"http://2130706433:{port}/ok.png", f"http://localhost:{port}/ok.png",
                       f"http://[::1]:{port}/ok.png", "http://169.254.169.254/latest/meta-data/",
                       "http://10.0.0.1/a.png", redirect(allowed, f"http://127.0.0.1:{port}/ok.png")):
            assert NOT_PUBLIC in refused(redirect(allowed, target), policy), target
        assert "credentials" in refused(redirect(allowed, f"http://user@127.0.0.1:{port}/ok.png"), policy)
        for target in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:6379/_INFO"):
            assert "only http(s) is fetched" in refused(redirect(allowed, target), policy), target
        assert inside.hits == []


@needs_alias
def test_the_connection_goes_to_the_checked_address(monkeypatch) -> None:
    """DNS rebinding: a name that resolves to an allowed address when checked and to loopback a moment later. The
    download connects to the address it checked, so the loopback server sees nothing."""
    with hostile_host("127.0.0.1") as inside:
        port = inside.server_address[1]
        with hostile_host("127.0.0.2", port) as allowed:
            real = socket.getaddrinfo
            answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)

            def rebinding(host, *args, **kwargs):
                if host == "rebind.test":
                    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
                return real(host, *args, **kwargs)

            monkeypatch.setattr(socket, "getaddrinfo", rebinding)
            policy = ImagePolicy(allow_remote=True, allowed_networks=("127.0.0.2/32",), remote_timeout=2.0)
            outcome, _ = timed_fetch(f"http://rebind.test:{port}/ok.png", policy)
            assert isinstance(outcome, Image.Image), outcome
            assert allowed.hits == ["/ok.png"] and inside.hits == []
            # and the next lookup, now answering loopback, is refused
            assert NOT_PUBLIC in refused(f"http://rebind.test:{port}/ok.png", policy)


# ------------------------------------------------------------------------------------------ deadline and limits
LOCAL = ImagePolicy(allow_remote=True, allow_private_hosts=True, remote_timeout=1.0, remote_max_bytes=100_000)


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_dripping_host_is_cut_off_at_the_deadline(path: str) -> None:
    """The deadline covers the whole download: a byte every 0.1 s (far inside any per-read timeout) still ends at
    remote_timeout, whether it drips the body or the headers."""
    with hostile_host() as host:
        outcome, seconds = timed_fetch(base(host) + path, LOCAL, limit=6.0)
    assert isinstance(outcome, ImageError) and COULD_NOT_FETCH in str(outcome)
    assert 0.9 <= seconds < 1.8, f"the download ended after {seconds:.2f} s, not at its 1 s deadline"


def test_every_fetch_failure_gives_the_same_message() -> None:
    """Refused, timed out, 404, too large, endless, too many redirects, unknown host: one message, with no byte
    counts or connection errors that would let a client map hosts and ports through the server."""
    with hostile_host() as host, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]  # bound, never listening: connection refused
        url = base(host)
        loop = redirect(host, redirect(host, redirect(host, redirect(host, url + "/ok.png"))))
        messages = {name: str(timed_fetch(u, LOCAL)[0]) for name, u in {
            "refused": f"http://127.0.0.1:{closed_port}/ok.png", "404": url + "/missing.png",
            "declared huge": url + "/declared-huge", "endless": url + "/endless", "drip": url + "/drip",
            "4 redirects": loop, "unknown host": "http://no-such-host.invalid/a.png",
            "a redirect no parser takes": redirect(host, "http://[::1")}.items()}
    assert len(set(messages.values())) == 1, messages
    message = messages["refused"]
    assert message.startswith("image URL: " + COULD_NOT_FETCH)
    for leak in ("1,000,000,000,000", "1000000000000", "Connection refused", "Errno", "404", "timed out"):
        assert leak not in message


def test_a_page_that_is_not_an_image() -> None:
    with hostile_host() as host:
        outcome, _ = timed_fetch(base(host) + "/html", LOCAL)
    assert isinstance(outcome, ImageError) and "not an image in an accepted format" in str(outcome)


def test_download_slots_are_bounded_and_fail_fast() -> None:
    policy = ImagePolicy(allow_remote=True, allow_private_hosts=True, remote_timeout=1.0, max_downloads=2)
    with hostile_host() as host:
        drips = [threading.Thread(target=timed_fetch, args=(base(host) + "/drip", policy), daemon=True)
                 for _ in range(2)]
        for thread in drips:
            thread.start()
        deadline = time.monotonic() + 2
        while policy.slots.busy < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome, seconds = timed_fetch(base(host) + "/ok.png", policy)
        assert isinstance(outcome, TooManyDownloads) and seconds < 0.2
        assert "too many image downloads in progress (the limit is 2)" in str(outcome)
        assert fetch_image(data_url(scene("red")), policy).size == (28, 28)  # data URLs need no slot
        for thread in drips:
            thread.join(5)
        assert policy.slots.busy == 0
        outcome, _ = timed_fetch(base(host) + "/ok.png", policy)
        assert isinstance(outcome, Image.Image)  # the slots came back


def test_policies_survive_pickling_with_fresh_slots() -> None:
    """Ray Serve pickles the settings for its replicas: the copy must work and count its own downloads."""
    policy = ImagePolicy(allow_remote=True, max_downloads=3)
    assert policy.slots.take(3)
    copy = pickle.loads(pickle.dumps(policy))
    assert copy == policy and copy.slots.busy == 0 and copy.slots.take(3)


def test_invalid_policies_are_refused() -> None:
    for kwargs in ({"max_downloads": 0}, {"remote_timeout": 0}, {"allowed_networks": ("not-a-network",)},
                   {"max_aspect_ratio": 0.5}, {"remote_max_bytes": 0}):
        with pytest.raises(ValueError):
            ImagePolicy(**kwargs)


# ---------------------------------------------------------------------------------------------- through the server
def _question(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}


def test_dripping_downloads_do_not_delay_other_requests(tiny_pipeline) -> None:
    """40 requests whose image drips: a few hold a download slot until the deadline, the rest get 429 at once, and a
    text-only request meanwhile is answered as fast as ever (before, the drips took every worker thread)."""
    policy = ImagePolicy(allow_remote=True, allow_private_hosts=True, remote_timeout=1.5, max_downloads=4)
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", images=policy, max_queue=64))

    async def run(url: str, drip: str) -> tuple[list[httpx.Response], httpx.Response, float, float]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
            started = time.monotonic()
            drips = [asyncio.create_task(client.post(CHAT, json=_question(drip))) for _ in range(40)]
            rating = asyncio.create_task(client.post(RATE, json={"items": [{"image_url": drip}]}))
            await asyncio.sleep(0.3)
            asked = time.monotonic()
            text = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            text_seconds = time.monotonic() - asked
            replies = await asyncio.gather(*drips, rating)
            return list(replies), text, text_seconds, time.monotonic() - started

    with hostile_host() as host, serve_in_thread(app) as url:
        replies, text, text_seconds, total = asyncio.run(run(url, base(host) + "/drip"))
    assert text.status_code == 200, text.text
    assert text_seconds < 3.0, f"a text-only request took {text_seconds:.2f} s while images dripped"
    assert total < 6.0, f"the dripping requests took {total:.2f} s, past their 1.5 s deadline"
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {400, 429} and statuses.count(429) >= 30, statuses
    for reply in replies:
        error = reply.json()["error"]
        if reply.status_code == 429:
            assert error["code"] == "too_many_downloads" and error["type"] == "rate_limit_error"
        else:
            assert COULD_NOT_FETCH in error["message"]


@needs_alias
def test_the_server_cannot_be_made_to_fetch_its_own_metrics(tiny_pipeline) -> None:
    policy = ImagePolicy(allow_remote=True, allowed_networks=("127.0.0.2/32",), remote_timeout=1.0)
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", images=policy))
    with hostile_host("127.0.0.2") as allowed, serve_in_thread(app) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        port = urllib.parse.urlsplit(url).port
        for target in (f"http://127.0.0.1:{port}/metrics", f"http://127.1:{port}/metrics",
                       f"http://2130706433:{port}/metrics", f"http://localhost:{port}/metrics"):
            for image_url in (target, redirect(allowed, target)):
                reply = client.post(CHAT, json=_question(image_url))
                assert reply.status_code == 400 and NOT_PUBLIC in reply.json()["error"]["message"], reply.text
                rated = client.post(RATE, json={"items": [{"image_url": image_url}]})
                assert rated.status_code == 400 and NOT_PUBLIC in rated.json()["error"]["message"], rated.text


def _strip(width: int, height: int) -> str:
    return data_url(Image.new("RGB", (width, height), "red"))


def test_thin_strips_and_huge_squares_are_refused_before_decoding(tiny_pipeline) -> None:
    """A 1 x 20000 PNG of a few hundred bytes made the stretch and pad policies allocate a 20000 x 20000 square."""
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for width, height, words in ((1, 20000, "aspect ratio of 20,000.0:1, over the limit of 100:1"),
                                     (100000, 1, "over the limit of 100:1"),
                                     (90, 9000, "square = 81,000,000 pixels, over the limit")):
            reply = client.post(CHAT, json=_question(_strip(width, height)))
            assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text
            rated = client.post(RATE, json={"items": [{"image_url": _strip(width, height)}]})
            assert rated.status_code == 400 and words in rated.json()["error"]["message"], rated.text
        assert client.post(CHAT, json=_question(_strip(40, 1000))).status_code == 200  # 25:1 is fine


def test_formats_outside_the_common_ones_are_not_decoded() -> None:
    """EPS (which Pillow renders with Ghostscript) and other exotic formats are refused; the common ones work."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    message = refused("data:image/eps;base64," + base64.b64encode(eps).decode(), REMOTE)
    assert "not an image in an accepted format" in message
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        scene("red").save(buffer, fmt)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        assert fetch_image(f"data:image/{fmt.lower()};base64,{encoded}", REMOTE).size == (28, 28), fmt


# --------------------------------------------------------------------------------------------------- local files
def test_local_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe.png")
    (allowed / "zero.png").symlink_to("/dev/zero")
    inside = ImagePolicy(allowed_local_dir=allowed)
    assert "not a regular file" in refused(f"file://{allowed / 'pipe.png'}", inside)
    assert "outside the allowed directory" in refused(f"file://{allowed / 'zero.png'}", inside)
    devices = ImagePolicy(allowed_local_dir=Path("/dev"))
    for device in ("/dev/zero", "/dev/urandom", "/dev/null"):
        assert "not a regular file" in refused(f"file://{device}", devices), device
    assert "NUL byte" in refused(f"file://{allowed}/a%00.png", inside)


def test_animated_images_give_their_first_frame_only() -> None:
    frames = [Image.new("RGB", (32, 32), (i, 255 - i, 0)) for i in range(0, 250, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    started = time.monotonic()
    image = fetch_image(f"data:image/gif;base64,{encoded}", REMOTE)
    assert time.monotonic() - started < 1.0
    assert image.mode == "RGB" and image.getpixel((5, 5)) == frames[0].getpixel((5, 5))


def test_cli_flags_build_the_policy(tmp_path: Path) -> None:
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    parser = build_parser()
    default = settings_from_args(parser.parse_args(["serve", "--model", str(tmp_path)])).images
    assert not default.allow_private_hosts and default.allowed_networks == () and default.max_downloads == 8
    assert default.max_aspect_ratio == 100
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--allow-remote-images", "--allow-private-image-hosts",
                              "--allow-image-network", "10.1.2.0/24", "--allow-image-network", "fd00::/8",
                              "--max-image-downloads", "3", "--max-image-aspect-ratio", "20", "--remote-timeout", "4"])
    images = settings_from_args(args).images
    assert images.allow_remote and images.allow_private_hosts and images.max_downloads == 3
    assert images.allowed_networks == ("10.1.2.0/24", "fd00::/8") and images.max_aspect_ratio == 20
    assert images.remote_timeout == 4
    bad = parser.parse_args(["serve", "--model", str(tmp_path), "--allow-image-network", "intranet"])
    with pytest.raises(ValueError, match="'intranet' is not a CIDR network"):
        settings_from_args(bad)


def test_https_checks_the_certificate_against_the_name_and_keeps_the_deadline(tmp_path: Path, monkeypatch) -> None:
    """The connection goes to the checked address, yet TLS still verifies the certificate for the URL's host name;
    a server that never completes the handshake is cut off at the deadline."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    policy = ImagePolicy(allow_remote=True, allow_private_hosts=True, remote_timeout=1.0)
    with hostile_host() as host, socket.socket() as silent:
        host.socket = context.wrap_socket(host.socket, server_side=True)
        port = host.server_address[1]
        outcome, _ = timed_fetch(f"https://localhost:{port}/ok.png", policy)
        assert isinstance(outcome, ImageError) and COULD_NOT_FETCH in str(outcome)  # not a trusted certificate
        monkeypatch.setattr(images_module, "_TLS", [ssl.create_default_context(cafile=str(cert))])
        outcome, _ = timed_fetch(f"https://localhost:{port}/ok.png", policy)
        assert isinstance(outcome, Image.Image), outcome
        outcome, _ = timed_fetch(f"https://127.0.0.1:{port}/ok.png", policy)
        assert isinstance(outcome, ImageError)  # the certificate names localhost, not the address
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        outcome, seconds = timed_fetch(f"https://127.0.0.1:{silent.getsockname()[1]}/ok.png", policy)
        assert isinstance(outcome, ImageError) and 0.9 <= seconds < 1.8
