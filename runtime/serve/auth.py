"""The optional API key of ``talkrt serve``: when set, every ``/v1`` route (HTTP and the live
WebSocket) needs ``Authorization: Bearer <key>``.

A browser cannot set headers on a WebSocket or an ``EventSource``, so ``?token=<key>`` in the
URL is accepted as well (the page at ``/`` passes on the ``token`` of its own URL). Query
strings can end up in proxy logs: prefer the header wherever the client can set one.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

ENV_VAR = "TALKRT_API_KEY"


class ApiKeyMiddleware:
    """ASGI middleware: ``401 {"error": {"code": "unauthorized", ...}}`` for a ``/v1`` request
    without the key (a WebSocket handshake gets the same 401 where the server supports denial
    responses, else it is closed with 1008)."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("an empty API key would let everyone in")
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith("/v1") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        given = self._token(scope) is not None
        message = "wrong API key" if given else "this server needs an API key: Authorization: Bearer <key>"
        body = json.dumps({"error": {"code": "unauthorized", "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", b'Bearer realm="talkrt"')]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await receive()                                   # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": message})

    def _allowed(self, scope) -> bool:
        token = self._token(scope)
        return token is not None and hmac.compare_digest(token.encode(), self.key)

    @staticmethod
    def _token(scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return token.strip() if scheme.lower() == "bearer" else ""
        tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return tokens[-1] if tokens else None
