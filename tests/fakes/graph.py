"""A fake Meta Graph API (Conversions API edge) on 127.0.0.1, built on FakeHttpServer.

Routes:
- `POST /{version}/{pixel_id}/events`: by default answers like Graph,
  `{"events_received": len(data), "messages": [], "fbtrace_id": ...}`; a body without a
  `data` list gets the code-100 "Invalid parameter" error.
- `GET /{version}/{pixel_id}` (the `check_token` probe): `{"id": pixel_id}`.
- anything else: Graph's code-100/subcode-33 "Unsupported request" error with HTTP 400.

A token registered with `invalidate_token` (or a request without any token) gets the
code-190 error on every route. Scripted answers (`fail_next`, `script`) take precedence over
all of that, in FIFO order, for whichever request comes next (POST or GET); `set_handler`
replaces the default answers; `set_delay` slows every answer down.

Error bodies can be taken by name from the research fixtures
(shared/fixtures/meta_capi/error_responses.json), see `error_fixture`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.fakes.http import FakeHttpServer, FakeResponse, RecordedRequest

DEFAULT_API_VERSION = "v25.0"


def shared_fixtures_dir() -> Path:
    """shared/fixtures: `$CAPI_SHARED_DIR/fixtures`, else `shared/` beside the repository.

    CI clones the repository into some folder with `shared/` next to it, so the path relative
    to this file (<repo>/tests/fakes/graph.py -> <repo>/../shared) holds there as well.
    """
    override = os.environ.get("CAPI_SHARED_DIR")
    if override:
        return Path(override) / "fixtures"
    return Path(__file__).resolve().parents[3] / "shared" / "fixtures"


@functools.cache
def _error_fixtures() -> dict[str, dict[str, Any]]:
    path = shared_fixtures_dir() / "meta_capi" / "error_responses.json"
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return {entry["name"]: entry for entry in entries}


def error_fixture_entries() -> list[dict[str, Any]]:
    """Every entry of error_responses.json: {name, http_status, body, retryable, source}."""
    return list(_error_fixtures().values())


def error_fixture(name: str) -> dict[str, Any]:
    """The error body (`{"error": {...}}`) of the fixture entry called `name`."""
    body = _error_fixtures()[name]["body"]
    if not isinstance(body, dict):
        raise KeyError(f"fixture {name!r} has no JSON error body")
    return body


def _bearer_token(request: RecordedRequest) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token
    return None


def _graph_error(
    message: str, code: int, *, subcode: int | None = None, error_type: str = "OAuthException"
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": error_type,
        "code": code,
        "fbtrace_id": "FakeGraphErrorTrace",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


GraphHandler = Callable[[RecordedRequest], FakeResponse]


class FakeGraph:
    """Records every request and answers like the Graph API; see the module docstring."""

    def __init__(self, api_version: str = DEFAULT_API_VERSION) -> None:
        self.api_version = api_version
        self._lock = threading.Lock()
        self._scripted: deque[FakeResponse] = deque()
        self._handler: GraphHandler | None = None
        self._delay = 0.0
        self._invalid_tokens: set[str] = set()
        self._trace_ids = itertools.count(1)
        self._server = FakeHttpServer(self._answer)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._server.base_url

    def start(self) -> FakeGraph:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------------------------

    def fail_next(
        self, status: int, body: bytes | str | dict[str, Any] | None = None, *, delay: float = 0.0
    ) -> None:
        """Answer the next request with `status` and `body` (default: Graph's code-1 error)."""
        if body is None:
            body = _graph_error("An unknown error occurred", 1)
        self.script([FakeResponse(status=status, body=body, delay=delay)])

    def fail_next_with_fixture(self, name: str, status: int | None = None) -> None:
        """Answer the next request with the named error_responses.json body.

        `status` defaults to the fixture's http_status, or 400 where the fixture has none.
        """
        entry = _error_fixtures()[name]
        self.fail_next(status or entry["http_status"] or 400, error_fixture(name))

    def script(self, responses: Iterable[FakeResponse]) -> None:
        """Queue answers for the next requests, first in first out."""
        with self._lock:
            self._scripted.extend(responses)

    def set_handler(self, handler: GraphHandler | None) -> None:
        """Replace the default answers (scripted answers still come first); None restores."""
        with self._lock:
            self._handler = handler

    def set_delay(self, seconds: float) -> None:
        """Wait this long before every answer (default and handler answers)."""
        with self._lock:
            self._delay = seconds

    def invalidate_token(self, token: str) -> None:
        """Requests with this bearer token get the code-190 "session has expired" error."""
        with self._lock:
            self._invalid_tokens.add(token)

    # -- inspection --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._server.requests)

    def posts(self) -> list[RecordedRequest]:
        return [r for r in self._server.requests if r.method == "POST"]

    def events(self) -> list[dict[str, Any]]:
        """Every event received: the `data` items of all POSTs, in arrival order."""
        received: list[dict[str, Any]] = []
        for request in self.posts():
            try:
                data = request.json().get("data")
            except (ValueError, AttributeError):
                continue
            if isinstance(data, list):
                received.extend(event for event in data if isinstance(event, dict))
        return received

    def tokens(self) -> list[str]:
        """The bearer tokens of all requests, in arrival order (requests without one skipped)."""
        return [t for t in (_bearer_token(r) for r in self._server.requests) if t is not None]

    def clear(self) -> None:
        """Forget the recorded requests (scripted answers and settings stay)."""
        self._server.take()

    def reset(self, api_version: str = DEFAULT_API_VERSION) -> None:
        """Back to a fresh fake without restarting the server.

        Stopping a FakeHttpServer takes up to half a second (the serve_forever poll interval),
        so test modules share one started fake and reset it between tests.
        """
        with self._lock:
            self.api_version = api_version
            self._scripted.clear()
            self._handler = None
            self._delay = 0.0
            self._invalid_tokens.clear()
        self._server.take()

    # -- answering (runs on the server's threads) --------------------------------------------

    def _answer(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            scripted = self._scripted.popleft() if self._scripted else None
            handler = self._handler
            delay = self._delay
            invalid_tokens = set(self._invalid_tokens)
        if scripted is not None:
            return scripted
        response = handler(request) if handler else self._default(request, invalid_tokens)
        if delay and not response.delay:
            response.delay = delay
        return response

    def _default(self, request: RecordedRequest, invalid_tokens: set[str]) -> FakeResponse:
        token = _bearer_token(request)
        if token is None:
            return FakeResponse(
                400, _graph_error("An access token is required to request this resource.", 190)
            )
        if token in invalid_tokens:
            return FakeResponse(400, error_fixture("token_expired_190_463"))
        parts = request.path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == self.api_version:
            pixel_id = parts[1]
            if request.method == "POST" and parts[2:] == ["events"]:
                return self._events(request)
            if request.method == "GET" and len(parts) == 2:
                return FakeResponse(200, {"id": pixel_id})
        return FakeResponse(
            400,
            _graph_error(
                f"Unsupported {request.method.lower()} request.",
                100,
                subcode=33,
                error_type="GraphMethodException",
            ),
        )

    def _events(self, request: RecordedRequest) -> FakeResponse:
        try:
            data = request.json().get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list) or not data:
            return FakeResponse(
                400, _graph_error("(#100) The parameter data is required", 100, subcode=2804001)
            )
        return FakeResponse(
            200,
            {
                "events_received": len(data),
                "messages": [],
                "fbtrace_id": f"FakeGraphTrace{next(self._trace_ids)}",
            },
        )
