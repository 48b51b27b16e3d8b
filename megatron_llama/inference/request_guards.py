"""What every HTTP request to the chat server passes before it reaches a route, in this order: the Host header
(a web page cannot reach a server bound to this machine by DNS rebinding), the API key, and the body size.

    policy = ServerPolicy(bind_host="127.0.0.1", api_key="KEY", allowed_hosts=("chat.example.org",))
    app.add_middleware(RequestGuards, policy=policy)
    warning = unguarded_warning(policy)        # a line for the log, or None

Host: when the server is bound to a loopback address, only localhost, 127.0.0.1 and [::1] (any port) and the
allowed hosts are accepted, else 421; bound beyond loopback, the Host is checked only when allowed hosts are given
("*" accepts every Host). Key: with api_key every route but /health and the chat page (/) needs
'Authorization: Bearer KEY' (the scheme in any case), else 401. Body: at most max_request_bytes, by its
Content-Length or as it arrives (chunked), else 413. Every refusal is in OpenAI's error shape (api_errors.py).
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass

from megatron_llama.inference.api_errors import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health", "/")


@dataclass(frozen=True)
class ServerPolicy:
    bind_host: str = "127.0.0.1"
    """The address the server listens on (--host)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names accepted beside the loopback ones (--allowed-hosts); "*" accepts any."""
    api_key: str | None = None
    """The key every route but /health and / requires (--api-key); None: no key."""
    max_request_bytes: int = 4 * 1024 * 1024
    """The largest request body accepted (--max-request-bytes)."""
    max_prompts_per_request: int = 64
    """The most prompts one /v1/completions request may hold (--max-prompts-per-request)."""

    @property
    def bound_to_loopback(self) -> bool:
        if self.bind_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind_host.strip("[]")).is_loopback
        except ValueError:
            return False


def unguarded_warning(policy: ServerPolicy) -> str | None:
    """The warning to log when the server is reachable beyond this machine by anyone, without a key."""
    if policy.bound_to_loopback or policy.api_key is not None:
        return None
    return (f"warning: serving on {policy.bind_host} without --api-key: anyone who can reach this port can use the "
            "model; pass --api-key KEY, or bind to 127.0.0.1")


def host_name(host_header: str) -> str:
    """The name part of a Host header, lowercased: 'LocalHost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def allowed_name(name: str) -> str:
    """An --allowed-hosts entry as host_name gives it: an IPv6 address bracketed, a port dropped."""
    try:
        return f"[{ipaddress.IPv6Address(name.strip('[]'))}]"
    except ValueError:
        return host_name(name)


def key_matches(authorization: str | None, api_key: str) -> bool:
    scheme, _, token = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


class _BodyTooLarge:
    """The receive channel of one request, counting its body; `exceeded` once it passes the limit."""

    def __init__(self, receive, limit: int):
        self.receive, self.limit, self.size, self.exceeded = receive, limit, 0, False

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                self.exceeded = True
                return {"type": "http.disconnect"}  # the route stops reading; its answer is replaced by the 413
        return message


class RequestGuards:
    """Pure ASGI middleware (it leaves the receive channel alone, so routes still see a client's disconnect)."""

    def __init__(self, app, policy: ServerPolicy):
        self.app, self.policy = app, policy
        allowed = {name.lower() for name in policy.allowed_hosts}
        self.any_host = "*" in allowed or (not policy.bound_to_loopback and not allowed)
        self.hosts = {*LOOPBACK_NAMES, *(allowed_name(name) for name in allowed)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        counted = _BodyTooLarge(receive, self.policy.max_request_bytes)
        started = False

        async def send_unless_too_large(message):
            nonlocal started
            if counted.exceeded and not started:
                started = True
                await self._too_large()(scope, receive, send)
            elif not counted.exceeded:
                started = True
                await send(message)

        try:
            await self.app(scope, counted, send_unless_too_large)
        except Exception:
            if not counted.exceeded or started:
                raise
            await self._too_large()(scope, receive, send)

    def _refusal(self, path: str, headers: dict[str, str]):
        policy = self.policy
        if not self.any_host and host_name(headers.get("host", "")) not in self.hosts:
            return error_response(421, f"Host {headers.get('host', '')!r} is not served here; add it to the server's "
                                       "--allowed-hosts", "host", "host_not_allowed")
        if policy.api_key is not None and path not in OPEN_PATHS and not key_matches(headers.get("authorization"),
                                                                                     policy.api_key):
            return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
        length = headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            return error_response(400, f"Content-Length {length!r} is not a number of bytes", "content-length")
        if length is not None and int(length) > policy.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self):
        return error_response(413, f"the request body exceeds {self.policy.max_request_bytes} bytes; send less, or "
                                   "raise the server's --max-request-bytes", None, "request_too_large")
