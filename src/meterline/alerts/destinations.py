"""SSRF guard for webhook URLs: only http(s) to public addresses, unless the operator allows private ones.

Checked when an endpoint is registered and again before every delivery (a name may resolve elsewhere
later: DNS rebinding). Every address a name resolves to must be public, not just the first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from meterline.errors import InvalidRequest

Resolver = Callable[[str, int], Sequence[str]]


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public(str(mapped))
    return not (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    )


def check_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> str:
    """``url`` if it may be called; otherwise ``InvalidRequest`` saying why (param ``url``)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest("url is not a valid URL", param="url") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest("url must start with http:// or https://", param="url")
    host = parts.hostname
    if not host:
        raise InvalidRequest("url has no host", param="url")
    if parts.username or parts.password:
        raise InvalidRequest("url must not carry credentials", param="url")
    if allow_private:
        return url
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError, ValueError):  # ValueError: e.g. a NUL in the name
        raise InvalidRequest(f"url host {host!r} does not resolve", param="url") from None
    if not addresses:
        raise InvalidRequest(f"url host {host!r} does not resolve", param="url")
    for address in addresses:
        if not is_public(address):
            raise InvalidRequest(
                f"url host {host!r} resolves to {address}, a loopback, private, link-local or reserved "
                "address; webhooks go to public addresses only (operators: webhook_allow_private)",
                param="url",
            )
    return url
