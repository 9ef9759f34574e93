"""Where an image's bytes come from: a data URL, a remote http(s) URL (opt-in), or a local file (CLI only).

Contract: read_image_source(url, policy) returns the encoded bytes or raises MediaError naming the rule.
- `data:<type>;base64,<data>` is always accepted; a data URL that is not base64, or whose payload is not
  valid base64, is refused; the byte cap is checked from the payload's length before decoding.
- `http(s)://` only with policy.allow_remote (serve's --allow-remote-media). The host is resolved once and
  EVERY address must be public (not loopback, private, link-local such as 169.254.169.254, shared,
  multicast, reserved or unspecified; IPv4-mapped, 6to4 and Teredo IPv6 forms are unwrapped first); the
  request then connects to the checked address itself (Host header and TLS SNI keep the name), so a DNS
  answer that changes between check and connect (rebinding) cannot reach an internal address. Redirects
  are refused, not followed; the body is capped at policy.max_bytes and the whole fetch at policy.timeout
  seconds; no proxy from the environment is used.
- `file://` URLs are never accepted here (a client over HTTP must not read the server's files); the CLI
  reads local paths with read_image_file().
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qwenkit.media.images import DEFAULT_MAX_IMAGE_BYTES, MediaError

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "FetchPolicy",
    "check_public_address",
    "read_image_file",
    "read_image_source",
]

DEFAULT_FETCH_TIMEOUT = 10.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """What a request's image URLs may be: remote fetches allowed or not, the byte cap, the fetch time."""

    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout: float = DEFAULT_FETCH_TIMEOUT


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaError(f"image URL host {host!r} does not resolve ({exc})", "media_fetch_failed") from None
    return [str(info[4][0]) for info in infos]


def check_public_address(address: str) -> IPAddress:
    """The address, or MediaError when it is not a public unicast one (see the module docstring)."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    inner: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
    for a in inner:
        if (
            not a.is_global
            or a.is_loopback
            or a.is_private
            or a.is_link_local
            or a.is_multicast
            or a.is_reserved
            or a.is_unspecified
        ):
            raise MediaError(
                f"image URL resolves to {address}, a loopback, private, link-local or reserved address: "
                "this server fetches images from public addresses only",
                "media_fetch_refused",
            )
    return ip


def _data_url(url: str, max_bytes: int, what: str) -> bytes:
    head, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{what}: a data URL needs a comma before its data: data:image/png;base64,...")
    params = head[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError(f"{what}: the data URL is not base64; send data:image/png;base64,<base64 bytes>")
    payload = "".join(payload.split())  # some clients wrap base64 in lines
    if len(payload) // 4 * 3 > max_bytes + 2:  # checked before decoding: base64 is 4 chars per 3 bytes
        raise MediaError(
            f"{what} is over the limit of {max_bytes} bytes (--max-image-bytes); send a smaller image",
            "image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what}: the data URL's payload is not valid base64") from None


def _fetch(url: str, policy: FetchPolicy, what: str, resolve: Resolver) -> bytes:
    import httpx

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise MediaError(f"{what}: the image URL has no host")
    if parts.username or parts.password:
        raise MediaError(f"{what}: image URLs with credentials are not accepted")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaError(f"{what}: the image URL's port is not a number from 0 to 65535") from None
    addresses = resolve(host, port)
    if not addresses:
        raise MediaError(f"image URL host {host!r} does not resolve", "media_fetch_failed")
    checked = [check_public_address(a) for a in addresses]  # every answer, so none is internal
    ip = checked[0]
    literal = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    target = parts._replace(netloc=f"{literal}:{port}").geturl()
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
    deadline = time.monotonic() + policy.timeout
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=policy.timeout, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", target, headers=headers, extensions=extensions) as response,
        ):
            if response.is_redirect:
                raise MediaError(
                    f"{what}: the image URL answered with a redirect ({response.status_code}); "
                    "redirects are not followed: give the final URL",
                    "media_fetch_refused",
                )
            if response.status_code != 200:
                raise MediaError(
                    f"{what}: the image URL answered HTTP {response.status_code}", "media_fetch_failed"
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > policy.max_bytes:
                raise MediaError(
                    f"{what} is {declared} bytes, over the limit of {policy.max_bytes} bytes "
                    "(--max-image-bytes)",
                    "image_too_large",
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise MediaError(
                        f"{what} is over the limit of {policy.max_bytes} bytes (--max-image-bytes)",
                        "image_too_large",
                    )
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("deadline")
            return bytes(body)
    except httpx.TimeoutException:
        raise MediaError(
            f"{what}: fetching the image URL took more than {policy.timeout:g} s", "media_fetch_failed"
        ) from None
    except httpx.HTTPError as exc:
        raise MediaError(f"{what}: fetching the image URL failed ({exc})", "media_fetch_failed") from None


def read_image_source(
    url: str, policy: FetchPolicy | None = None, what: str = "image", resolve: Resolver = _resolve
) -> bytes:
    """The encoded bytes an image URL names, under `policy` (see the module docstring)."""
    policy = policy or FetchPolicy()
    if not isinstance(url, str) or not url:
        raise MediaError(f"{what}: give the image as a data: URL (or an http(s) URL where allowed)")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy.max_bytes, what)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError(
                f"{what}: remote image URLs are off on this server; send the image as a data: URL "
                "(or start the server with --allow-remote-media)",
                "media_fetch_refused",
            )
        return _fetch(url, policy, what, resolve)
    if scheme == "file":
        raise MediaError(
            f"{what}: file:// URLs are never read over HTTP; send the image as a data: URL",
            "media_fetch_refused",
        )
    raise MediaError(f"{what}: unsupported image URL scheme {scheme or url[:20]!r}; send a data: URL")


def read_image_file(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A local image file's bytes (the CLI's --image), size-checked before reading."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MediaError(f"no image file at {path}: pass the path of a PNG, JPEG, WebP or GIF file")
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(
            f"{path} is {size} bytes, over the limit of {max_bytes} bytes; pass a smaller image",
            "image_too_large",
        )
    return path.read_bytes()
