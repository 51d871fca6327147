"""Images of a request: data URLs always; ``file://`` only under a directory the operator allows; ``http(s)://``
only when enabled. Every image is decoded in full under a pixel and an aspect-ratio limit, in one of a few common
formats (decompression bombs, thin strips and truncated files fail here, before the model sees anything).

Remote images are fetched with a client of our own (``http.client`` on a socket we connect), because each of these
needs control that a general-purpose client does not give:

* one deadline for the whole download (name lookup, connect, TLS, every redirect hop, headers and body): a server
  that drips one byte at a time cannot hold a worker past it;
* a bounded number of downloads at once, across all requests: one more is refused at once with
  :class:`TooManyDownloads` (the app answers 429) instead of waiting in the request thread pool that every request,
  text-only ones included, needs;
* no server-side request forgery: the host is resolved, every address it resolves to must be public (not loopback,
  private, link-local, shared, multicast, unspecified or reserved, IPv4 inside IPv6 included), and the connection
  goes to the address that was checked, so a name that resolves differently a moment later (DNS rebinding) gains
  nothing. Each redirect hop is checked the same way. ``allow_private_hosts`` (or ``allowed_networks``) lifts this
  for operators whose images live on their own network, and for tests;
* no oracle: every failure to fetch (no such host, refused, timed out, reset, an HTTP status other than 200, too
  many redirects, too large) gives the same message, so the server cannot be used to scan ports or probe hosts.

Proxy settings from the environment are not used: a proxy would resolve the name itself, out of reach of the checks.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from owl2.processing.image import DEFAULT_MAX_ASPECT_RATIO, ImageError, load_image

__all__ = ["SERVER_IMAGE_FORMATS", "ImagePolicy", "TooManyDownloads", "fetch_image"]

#: The formats the server decodes (Pillow names): what browsers and phones produce. The many other formats Pillow
#: reads (EPS, which runs Ghostscript, among them) are not exposed to untrusted input.
SERVER_IMAGE_FORMATS: tuple[str, ...] = ("AVIF", "BMP", "GIF", "JPEG", "MPO", "PNG", "TIFF", "WEBP")
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class TooManyDownloads(ImageError):
    """Every download slot is taken: the request should be retried later (HTTP 429), it is not invalid."""


class _Slots:
    """Counts the downloads in flight under one policy. A copy (pickling, for Ray replicas) starts empty: slots
    belong to one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"fresh": True}  # a false value would skip __setstate__ and leave the copy without its lock

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def take(self, limit: int) -> bool:
        with self._lock:
            if self._busy >= limit:
                return False
            self._busy += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def busy(self) -> int:
        return self._busy


@dataclass(frozen=True)
class ImagePolicy:
    """What the server accepts as a request image, and how it fetches remote ones."""

    max_pixels: int = 4096 * 4096
    """Width x height per image, checked from the header before decoding."""
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    """Long side over short side per image, checked from the header before decoding; None: any."""
    allowed_local_dir: Path | None = None
    """``file://`` URLs must resolve (symlinks followed) inside this directory; None refuses them."""
    allow_remote: bool = False
    remote_timeout: float = 10.0
    """Seconds for a whole download: lookup, connect, redirects, headers and body together."""
    remote_max_bytes: int = 20 * 2**20
    max_downloads: int = 8
    """Downloads in flight at once, all requests together; one more is refused with :class:`TooManyDownloads`."""
    allow_private_hosts: bool = False
    """Fetch from hosts that resolve to loopback, private, link-local or otherwise non-public addresses."""
    allowed_networks: tuple[str, ...] = ()
    """Non-public networks (CIDR, e.g. ``"10.1.2.0/24"``) fetched from all the same: a narrower allow_private_hosts."""
    formats: tuple[str, ...] | None = SERVER_IMAGE_FORMATS
    """Image formats decoded (Pillow names); None: every format Pillow reads."""
    slots: _Slots = field(default_factory=_Slots, compare=False, repr=False)
    """The download counter of this policy (shared by every request that uses it)."""

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        if not self.remote_timeout > 0:
            raise ValueError(f"the remote image timeout must be positive, got {self.remote_timeout}")
        if self.remote_max_bytes <= 0:
            raise ValueError(f"the remote image size cap must be positive, got {self.remote_max_bytes}")
        if self.max_downloads < 1:
            raise ValueError(f"max_downloads must be at least 1, got {self.max_downloads}")
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed image network {network!r} is not a CIDR network ({exc})") from None

    def load(self, source: Any) -> Image.Image:
        """``source`` decoded under this policy's limits (see :func:`owl2.processing.image.load_image`)."""
        return load_image(source, max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio,
                          formats=self.formats)


def fetch_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The RGB image behind one ``image_url``; raises :class:`ImageError` naming the problem (its subclass
    :class:`TooManyDownloads` when every download slot is taken)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return policy.load(url)
    if scheme == "file":
        return policy.load(_local_path(url, policy))
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError("http(s) image URLs are disabled on this server (start it with --allow-remote-images); "
                             "send the image as a data URL")
        return policy.load(download(url, policy))
    raise ImageError(f"unsupported image URL {url[:60]!r}: expected a data:image/...;base64 URL, file:// or http(s)://")


def _local_path(url: str, policy: ImagePolicy) -> Path:
    if policy.allowed_local_dir is None:
        raise ImageError("file:// image URLs are disabled on this server (start it with --allowed-local-media DIR)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"file:// URL with a remote host {parsed.netloc!r}")
    text = urllib.parse.unquote(parsed.path)
    if "\x00" in text:
        raise ImageError("file:// URL with a NUL byte in its path")
    root = policy.allowed_local_dir.resolve()
    path = Path(text).resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"file:// path {str(path)!r} is outside the allowed directory")
    # load_image refuses what is not a regular file (a FIFO would block, /dev/zero never end) before opening it.
    return path


# ------------------------------------------------------------------------------------------------------ downloads
def download(url: str, policy: ImagePolicy) -> bytes:
    """The body of ``url`` (http or https) under ``policy``: one overall deadline, a size cap, public hosts only
    (unless allowed), at most :data:`MAX_REDIRECTS` redirects, each hop checked. Raises :class:`ImageError`."""
    if not policy.slots.take(policy.max_downloads):
        raise TooManyDownloads(f"too many image downloads in progress (the limit is {policy.max_downloads}); "
                               "retry shortly, or send the image as a data URL")
    try:
        return _Download(policy).run(url)
    finally:
        policy.slots.give_back()


def _could_not_fetch(policy: ImagePolicy) -> ImageError:
    # One message for every network or HTTP failure: telling "refused" from "timed out" or "404" apart would let a
    # client map hosts and ports through the server.
    return ImageError(
        f"image URL: could not fetch the image (no answer, refused, not HTTP 200, more than {MAX_REDIRECTS} "
        f"redirects, over {policy.remote_max_bytes:,} bytes, or not done within {policy.remote_timeout:g} s)"
    )


class _Download:
    """One download: the deadline, and a watchdog that ends its connection there wherever it is blocked."""

    def __init__(self, policy: ImagePolicy) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + policy.remote_timeout
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(policy.remote_timeout, self._expire)
        self._timer.daemon = True

    def run(self, url: str) -> bytes:
        self._timer.start()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                status, location, body = self._get(url)
                if status in _REDIRECTS and location:
                    try:
                        url = urllib.parse.urljoin(url, location)
                    except ValueError:  # a Location no URL parser takes ("http://[::1"): a failure like any other
                        raise _could_not_fetch(self.policy) from None
                    continue
                if status != 200:
                    raise _could_not_fetch(self.policy)
                return body
            raise _could_not_fetch(self.policy)
        finally:
            self._timer.cancel()
            with self._lock:
                for sock in self._sockets:
                    sock.close()
                self._sockets.clear()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self._expired:
            raise _could_not_fetch(self.policy)
        return left

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def _watch(self, sock: socket.socket) -> None:
        # shutdown() acts on the connection, not the descriptor, so shutting a duplicate down from the timer thread
        # wakes the reader of the original (or of its TLS wrapper) at once.
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self._expired:
                _shutdown(duplicate)

    def _get(self, url: str) -> tuple[int, str | None, bytes]:
        """One request: status, Location header and body (the body only for 200)."""
        https, host, port, target = _parse_remote(url)
        addresses = _resolve(host, port, self, self.policy)
        connection_type = http.client.HTTPSConnection if https else http.client.HTTPConnection
        kwargs: dict[str, Any] = {"context": _tls_context()} if https else {}
        connection: http.client.HTTPConnection | None = None
        try:
            connection = connection_type(host, port, timeout=self.remaining(), **kwargs)
            # http.client would resolve the host again; it gets the checked addresses instead (no rebinding window).
            connection._create_connection = (  # type: ignore[attr-defined]
                lambda *_args, **_kwargs: self._connect(addresses))
            connection.putrequest("GET", target, skip_accept_encoding=True)
            connection.putheader("Accept", "image/*")
            connection.putheader("Accept-Encoding", "identity")
            connection.putheader("User-Agent", "owl2")
            connection.putheader("Connection", "close")
            connection.endheaders()
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.status != 200:
                return response.status, None, b""
            return 200, None, self._body(response)
        except ImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ssl.SSLError is an OSError
            raise _could_not_fetch(self.policy) from exc
        finally:
            if connection is not None:
                connection.close()

    def _connect(self, addresses: list[tuple[int, Any]]) -> socket.socket:
        error: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self._watch(sock)
                sock.settimeout(self.remaining())
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError("no address")

    def _body(self, response: http.client.HTTPResponse) -> bytes:
        limit = self.policy.remote_max_bytes
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _could_not_fetch(self.policy)
        data = bytearray()
        while True:
            self.remaining()
            chunk = response.read(min(_CHUNK, limit + 1 - len(data)))
            if not chunk:
                break
            data.extend(chunk)
            if len(data) > limit:
                raise _could_not_fetch(self.policy)
        self.remaining()  # a body cut short by the watchdog ends like a complete one: it must not count as one
        return bytes(data)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)


def _parse_remote(url: str) -> tuple[bool, str, int, str]:
    """(https?, host, port, request target) of an http(s) URL; :class:`ImageError` for what we will not fetch."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ImageError("image URL: contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"image URL: malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"image URL: redirected to a {scheme or 'relative'}: URL; only http(s) is fetched")
    if "@" in parts.netloc:
        raise ImageError("image URL: credentials (user@host) in image URLs are not supported")
    host = parts.hostname
    if not host:
        raise ImageError("image URL: no host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ImageError("image URL: invalid host name") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme == "https", host, port or (443 if scheme == "https" else 80), target


def _resolve(host: str, port: int, download: _Download, policy: ImagePolicy) -> list[tuple[int, Any]]:
    """The addresses (family, sockaddr) of ``host``, all of them allowed by ``policy``, within the deadline."""
    found: dict[str, Any] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found["error"] = exc

    # getaddrinfo has no timeout of its own; the lookup runs aside so a slow resolver cannot outlast the deadline.
    resolver = threading.Thread(target=lookup, name="owl2-image-lookup", daemon=True)
    resolver.start()
    resolver.join(download.remaining())
    if resolver.is_alive() or "infos" not in found or not found["infos"]:
        raise _could_not_fetch(policy)
    addresses = []
    for family, _type, _proto, _name, sockaddr in found["infos"]:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not _allowed(address, policy):
            raise ImageError(
                f"image URL: the host {host!r} is not a public address (loopback, private, link-local, multicast "
                "and reserved addresses are refused; the operator can allow them with --allow-private-image-hosts)"
            )
        addresses.append((family, sockaddr))
    if not addresses:
        raise _could_not_fetch(policy)
    return addresses


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: ImagePolicy) -> bool:
    if policy.allow_private_hosts:
        return True
    if any(address in ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks):
        return True
    return all(_public(a) for a in _embedded(address))


def _embedded(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Any]:
    """The address and any IPv4 address it carries (mapped, 6to4, Teredo, NAT64), each of which must be public."""
    found: list[Any] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in ipaddress.ip_network("64:ff9b::/96"):
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_global and not (address.is_loopback or address.is_private or address.is_link_local
                                      or address.is_multicast or address.is_unspecified or address.is_reserved)


_TLS: list[ssl.SSLContext] = []


def _tls_context() -> ssl.SSLContext:
    """Certificate-checking TLS context, made once: certifi's roots when installed (as httpx uses), else the
    system's."""
    if not _TLS:
        try:
            import certifi

            context = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            context = ssl.create_default_context()
        _TLS.append(context)
    return _TLS[0]
