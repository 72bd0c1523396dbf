"""What one client can hold is bounded. `Guard`, a pure ASGI middleware (so disconnects still reach the
handlers), checks the Host header and the key and reads the body itself, refusing it once it passes the
size limit or its deadline, whatever its framing; `uvicorn_config` closes connections whose request head
does not arrive in time (`HeaderDeadlineH11`) and caps how many are open.
"""

import asyncio
import functools
import hmac
import ipaddress

import h11
from starlette.datastructures import Headers, QueryParams
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.serve.schemas import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class Guard:
    """Pure ASGI middleware: the Host allow-list, the API key, and the body, which it reads whole here
    (at most `max_body_bytes`, within `body_timeout` seconds, whatever the framing) and hands on."""

    def __init__(self, app, api_key, hosts, max_body_bytes, body_timeout):
        self.app, self.api_key, self.hosts = app, api_key, hosts
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
            body = await self._read_body(receive)
        except APIError as e:  # the body may be unread: close the connection rather than drain it
            return await e.response(close=True)(scope, receive, send)
        if body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _check(self, scope):
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            raise APIError(400, f"this server answers to the hosts {', '.join(self.hosts)}, not {host!r} (a "
                                "server on loopback without an API key refuses other names, against DNS "
                                "rebinding; start it with --api-key to serve them)", code="invalid_host")
        if self.api_key and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            query = QueryParams(scope["query_string"])
            if scope["path"] == "/" and "api_key" in query:  # the page: open /?api_key=KEY
                scheme, token = "bearer", query["api_key"]
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               "authentication_error", code="invalid_api_key")
        if "transfer-encoding" in headers and "content-length" in headers:
            raise APIError(400, "the request has both Content-Length and Transfer-Encoding; send one of them")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive):
        try:
            return await asyncio.wait_for(self._read(receive), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                "send it whole, without pauses", code="body_timeout") from None

    async def _read(self, receive):
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")
        return bytes(body)


def _replay(body, receive):
    """An ASGI receive that gives the body read by the guard, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def _host_name(host):
    """The name in a Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = host.lower()
    return host if host.endswith("]") else host.rsplit(":", 1)[0]


def allowed_hosts(bind, api_key):
    """Host names a server bound to `bind` answers to; None for any. On loopback without a key, only
    loopback names: a web page can point its own DNS name at 127.0.0.1, but not send Host: localhost."""
    if api_key:
        return None
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return tuple(dict.fromkeys(LOOPBACK_HOSTS + (f"[{bind}]" if ":" in bind else bind,)))


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request head: a connection that has not sent a
    whole request line and headers within `header_timeout` seconds of opening (or of its last response)
    is closed, so half-sent requests cannot hold connections."""

    def __init__(self, *args, header_timeout=10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_deadline = header_timeout, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host="127.0.0.1", port=8000, header_timeout=10.0, max_connections=256):
    """uvicorn settings that bound what slow or idle clients hold: a request head within `header_timeout`
    seconds and 16 KiB, idle keep-alive connections closed after 5 s, at most `max_connections`
    connections or requests at once (more get 503)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          http=functools.partial(HeaderDeadlineH11, header_timeout=header_timeout),
                          timeout_keep_alive=5, limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=16 * 1024)
