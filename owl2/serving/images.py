"""Images of a request: data URLs always; ``file://`` only under a directory the operator allows; ``http(s)://``
only when enabled, with a timeout and a size cap. Every image is decoded in full under a pixel limit (decompression
bombs and truncated files fail here, before the model sees anything)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from owl2.processing.image import ImageError, load_image


@dataclass(frozen=True)
class ImagePolicy:
    max_pixels: int = 4096 * 4096
    allowed_local_dir: Path | None = None
    """``file://`` URLs must resolve (symlinks followed) inside this directory; None refuses them."""
    allow_remote: bool = False
    remote_timeout: float = 10.0
    remote_max_bytes: int = 20 * 2**20


def fetch_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The RGB image behind one ``image_url``; raises :class:`ImageError` naming the problem."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return load_image(url, max_pixels=policy.max_pixels)
    if scheme == "file":
        return load_image(_local_path(url, policy), max_pixels=policy.max_pixels)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError("http(s) image URLs are disabled on this server (start it with --allow-remote-images); "
                             "send the image as a data URL")
        return load_image(_download(url, policy), max_pixels=policy.max_pixels)
    raise ImageError(f"unsupported image URL {url[:60]!r}: expected a data:image/...;base64 URL, file:// or http(s)://")


def _local_path(url: str, policy: ImagePolicy) -> Path:
    if policy.allowed_local_dir is None:
        raise ImageError("file:// image URLs are disabled on this server (start it with --allowed-local-media DIR)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"file:// URL with a remote host {parsed.netloc!r}")
    root = policy.allowed_local_dir.resolve()
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"file:// path {str(path)!r} is outside the allowed directory")
    return path


def _download(url: str, policy: ImagePolicy) -> bytes:
    import httpx

    try:
        with httpx.Client(timeout=policy.remote_timeout, follow_redirects=True, max_redirects=3) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageError(f"image URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > policy.remote_max_bytes:
                raise ImageError(f"image URL: {int(declared):,} bytes, over the limit of {policy.remote_max_bytes:,}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data.extend(chunk)
                if len(data) > policy.remote_max_bytes:
                    raise ImageError(f"image URL: more than {policy.remote_max_bytes:,} bytes")
            return bytes(data)
    except httpx.TimeoutException as exc:
        raise ImageError(f"image URL: no answer within {policy.remote_timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise ImageError(f"image URL: cannot fetch it ({type(exc).__name__}: {exc})") from exc

