"""Image bytes from an OpenAI `image_url`: data: URLs always; http(s) only when enabled, and then only
from allow-listed hosts, public addresses, within a size and a time limit, with redirects re-checked.

Known limit: the address check resolves the host before httpx connects, so a DNS answer that changes
between the two (rebinding) is not caught; keep the allow-list to hosts you trust.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import socket
import urllib.parse

import httpx
from ivl_proto.errors import ErrorCode, ServingError, invalid

from ivl_gateway.settings import GatewaySettings

_MAX_REDIRECTS = 3


def decode_data_url(url: str, max_bytes: int) -> bytes:
    comma = url.find(",")
    if comma < 0:
        raise invalid("the data: URL has no ',' separating its header from the data")
    header = url[:comma]
    if header.endswith(";base64"):
        # binascii reads the (ASCII) str in place; base64.b64decode would first copy it into bytes.
        # Non-alphabet characters are skipped, as b64decode(validate=False) does.
        try:
            data = binascii.a2b_base64(url[comma + 1:])
        except (binascii.Error, ValueError) as error:
            raise invalid(f"the data: URL is not valid base64: {error}") from None
    else:
        data = urllib.parse.unquote_to_bytes(url[comma + 1:])
    if not data:
        raise invalid("the data: URL holds no bytes")
    if len(data) > max_bytes:
        raise ServingError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"the image is {len(data)} bytes; the limit is {max_bytes} bytes"
        )
    return data


def _host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


async def _check_addresses(host: str, port: int, allow_private: bool) -> None:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise invalid(f"could not resolve image host {host!r}: {error}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not allow_private and not address.is_global:
            raise invalid(f"image host {host!r} resolves to a non-public address ({address}); refused")


class ImageFetcher:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings

    async def load(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, self._settings.max_request_bytes)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise invalid(f"image_url scheme {scheme!r} is not supported; use a data: URL (base64)")
        if not self._settings.allow_url_fetch:
            raise invalid(
                "fetching image URLs is disabled on this gateway; send the image inline as a "
                "data:image/...;base64 URL (or ask the operator to set IVL_GATEWAY_ALLOW_URL_FETCH)"
            )
        try:
            return await asyncio.wait_for(self._fetch(url), timeout=self._settings.url_timeout_s)
        except httpx.HTTPError as error:
            raise invalid(f"could not fetch the image URL: {type(error).__name__}: {error}") from None
        except TimeoutError:
            raise ServingError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"fetching the image took longer than {self._settings.url_timeout_s:g} s; the limit",
            ) from None

    async def _fetch(self, url: str) -> bytes:
        settings = self._settings
        async with httpx.AsyncClient(follow_redirects=False, timeout=settings.url_timeout_s, trust_env=False) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                parts = urllib.parse.urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise invalid(f"image URL {url!r} is not an http(s) URL")
                if not _host_allowed(parts.hostname, settings.url_allowed_hosts):
                    raise invalid(
                        f"image host {parts.hostname!r} is not in the allow-list "
                        f"({', '.join(settings.url_allowed_hosts) or 'empty'})"
                    )
                port = parts.port or (443 if parts.scheme == "https" else 80)
                await _check_addresses(parts.hostname, port, settings.allow_private_urls)
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise invalid(f"fetching the image URL answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > settings.url_max_bytes:
                        raise _too_large(declared, settings.url_max_bytes)
                    chunks: list[bytes] = []
                    total = 0
                    async for chunk in response.aiter_bytes():
                        total += len(chunk)
                        if total > settings.url_max_bytes:
                            raise _too_large(total, settings.url_max_bytes)
                        chunks.append(chunk)
                    return b"".join(chunks)
        raise invalid(f"the image URL redirected more than {_MAX_REDIRECTS} times")


def _too_large(size: int, limit: int) -> ServingError:
    return ServingError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"the image at the URL is at least {size} bytes; the limit is {limit} bytes"
    )
