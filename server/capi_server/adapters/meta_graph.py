"""Async client for the Meta Graph API edge used by the Conversions API.

`MetaGraphClient.send_events` POSTs `{base}/{version}/{pixel_id}/events` and never raises for
Graph, HTTP or network failures: it returns a `GraphSendResult`, which is either a
`GraphSuccess` or a `MetaGraphError` already classified as transient (retry later) or
permanent (fix the configuration or the event). The client does not retry by itself; the caller
(the outbox worker) owns the retry policy and backoff, and a resend is safe because every event
carries a deterministic `event_id` that Meta deduplicates.

Access token: it travels only in the `Authorization: Bearer` header. Meta also accepts an
`access_token` query or body parameter, but a query parameter ends up in proxy and access logs,
and a body parameter would end up in any request dump or audit copy of the payload; the header
is the one place HTTP tooling already treats as secret. An `access_token` key the caller may
have left in the body is dropped before sending.

Error classification follows shared/design/research/meta-capi.md section 4; see
`classify_graph_error`.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import httpx2

from capi_server.adapters import metrics

logger = logging.getLogger("capi_server.meta_graph")

DEFAULT_BASE_URL: Final = "https://graph.facebook.com"
DEFAULT_API_VERSION: Final = "v25.0"
# Meta's CAPI troubleshooting page recommends a 1500 ms client timeout (typical latency is
# under 600 ms); connecting should be much faster than a full answer.
DEFAULT_READ_TIMEOUT_SECONDS: Final = 1.5
DEFAULT_CONNECT_TIMEOUT_SECONDS: Final = 1.0

# How much of a response body an error keeps for the audit log.
RAW_EXCERPT_CHARS: Final = 500

# Graph codes that no resend can fix: invalid parameter (100, including every 2804xxx event
# validation subcode), method/capability (3), too many parameters (105), invalid or expired
# token (190), permissions (10 and 200-299).
_PERMANENT_CODES: Final = frozenset({3, 10, 100, 105, 190})
_PERMISSION_CODE_RANGE: Final = range(200, 300)

# Codes the research names as temporary (unknown, service, throttling, policy block, data set
# not ready). Any code not in `_PERMANENT_CODES` is treated as transient anyway; this set only
# documents the known ones and selects the rate-limit hint.
TRANSIENT_CODES: Final = frozenset({1, 2, 4, 17, 341, 368, 613, 80003, 80004, 21009})
_RATE_LIMIT_CODES: Final = frozenset({4, 17, 341, 613, 80003, 80004})

_API_VERSION_PATTERN: Final = re.compile(r"v\d+\.\d+")
# Pixel and dataset ids are numeric. Checking this keeps a bad id from steering the request to
# another Graph path (it is interpolated into the URL).
_PIXEL_ID_PATTERN: Final = re.compile(r"\d{1,32}")

_REDACTED: Final = "[REDACTED]"


class GraphFailureKind(enum.StrEnum):
    """Where a call failed; a low-cardinality label for metrics and logs."""

    GRAPH_ERROR = "graph_error"  # Graph answered with its JSON error envelope.
    HTTP_STATUS = "http_status"  # Non-2xx status without a Graph error envelope.
    MALFORMED_BODY = "malformed_body"  # Body is not the JSON we expect (HTML, empty, truncated).
    TIMEOUT = "timeout"  # Connect, write, read or pool timeout.
    NETWORK = "network"  # Connection refused or reset, DNS, protocol errors.
    INVALID_REQUEST = "invalid_request"  # Rejected locally before sending (bad id, no token).


@dataclass(frozen=True, slots=True)
class GraphSuccess:
    """Meta accepted the request (2xx with `events_received`)."""

    events_received: int
    messages: tuple[str, ...]
    fbtrace_id: str | None
    raw: dict[str, object]
    elapsed_seconds: float


@dataclass(frozen=True, slots=True)
class GraphObjectFound:
    """`check_token` result: the token can read the pixel / dataset object."""

    object_id: str
    raw: dict[str, object]
    elapsed_seconds: float


@dataclass(frozen=True, slots=True)
class MetaGraphError:
    """A failed Graph call, classified. Fields mirror the Graph error envelope."""

    message: str
    type: str | None
    code: int | None
    error_subcode: int | None
    error_user_msg: str | None
    error_user_title: str | None
    fbtrace_id: str | None
    # The classification result: True means "send the same request again later".
    is_transient: bool
    http_status: int | None
    hint: str | None
    # The first RAW_EXCERPT_CHARS characters of the response body (token redacted), for the
    # audit log. Empty for network failures.
    raw_excerpt: str
    elapsed_seconds: float
    kind: GraphFailureKind = field(default=GraphFailureKind.GRAPH_ERROR)

    @property
    def is_permanent(self) -> bool:
        """True when resending cannot succeed: the token, permissions or event must change."""
        return not self.is_transient


GraphSendResult = GraphSuccess | MetaGraphError
TokenCheckResult = GraphObjectFound | MetaGraphError


def is_permission_code(code: int) -> bool:
    """Graph permission errors: code 10 and the 200-299 range."""
    return code == 10 or code in _PERMISSION_CODE_RANGE


def classify_graph_error(
    http_status: int | None,
    code: int | None,
    subcode: int | None,
    is_transient_flag: bool | None,
) -> bool:
    """True when the failure is transient (resend later), False when it is permanent.

    Rules, in order:
    1. `is_transient: true` from Graph always means transient. `is_transient: false` is not
       taken as proof of permanence: Graph sets it on code-100 errors that rule 2 already
       covers, and for an unknown code a wasted resend is cheaper than a lost event.
    2. A permanent Graph code (100 with any subcode such as 2804003/2804066, 3, 105, 190,
       10, 200-299) is permanent, whatever the HTTP status: Graph reports e.g. 190 with a 500
       at times, and the code is the more specific signal.
    3. Everything else is transient: no Graph error at all (network failure, timeout, HTML or
       empty body, 5xx, 429), the known throttling/temporary codes (1, 2, 4, 17, 341, 368, 613,
       80003, 80004, 21009) and codes we do not know.

    `http_status` and `subcode` do not change the outcome today; they are part of the signature
    so the table-driven tests state the full input and a future rule needs no new call sites.
    """
    del http_status, subcode  # See the docstring: the code decides, the status cannot override.
    if is_transient_flag is True:
        return True
    if code is None:
        return True
    return not (code in _PERMANENT_CODES or is_permission_code(code))


def hint_for(code: int | None, subcode: int | None) -> str | None:
    """A short operator-facing remedy for a Graph error, or None when there is nothing to add."""
    if code is None:
        return None
    if code == 100:
        if subcode == 2804066:
            return (
                "Meta rejects this event name for action_source=business_messaging; use the "
                "'business_messaging' event-name preset (LeadSubmitted, QualifiedLead)"
            )
        if subcode == 2804003:
            return "event_time is older than 7 days; such events cannot be sent any more"
        if subcode == 2804009:
            return "Purchase events need custom_data.value and custom_data.currency"
        if subcode == 33:
            return (
                "check that the pixel (dataset) id exists and that the token's user has access "
                "to it"
            )
        return (
            "check that the pixel exists and that the token's user has access to it; "
            "(#100) Invalid parameter: check the event data"
        )
    if code == 190:
        detail = {
            460: "the token was invalidated by a password change; ",
            463: "the token has expired; ",
            467: "the token is invalid; ",
        }.get(subcode or 0, "")
        return (
            f"{detail}refresh the access token of the ad account (ad_accounts.access_token) "
            "or the user account (user_accounts.access_token)"
        )
    if is_permission_code(code):
        return (
            "the token lacks a permission: grant ads_management (or business_management) and "
            "page_events to the app / system user and issue a new token"
        )
    if code == 3:
        return "the app lacks the capability for this call; check the app's permissions in Meta"
    if code == 105:
        return "the request has too many or malformed parameters; check the request body"
    if code in _RATE_LIMIT_CODES:
        return "Meta rate limit reached; the send is retried with backoff"
    if code == 368:
        return "temporarily blocked by Meta for a policy violation; the send is retried later"
    if code == 21009:
        return "the data set upload is temporarily not ready; the send is retried later"
    return None


class MetaGraphClient:
    """One connection pool to the Graph API, shared by every send of this process.

    Use as `async with MetaGraphClient(...) as graph:` or call `aclose()` at shutdown. An
    injected `http_client` belongs to the caller and is not closed by `aclose()`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = DEFAULT_API_VERSION,
        *,
        read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS,
        connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        # A wrong version is a configuration error: fail at startup, not on every send.
        if not _API_VERSION_PATTERN.fullmatch(api_version):
            raise ValueError(f"api_version must look like 'v25.0', got {api_version!r}")
        self._base_url = base_url.rstrip("/")
        self._api_version = api_version
        self._timeout = httpx2.Timeout(
            read_timeout_seconds,
            connect=connect_timeout_seconds,
            read=read_timeout_seconds,
            write=read_timeout_seconds,
            pool=connect_timeout_seconds,
        )
        self._owns_http_client = http_client is None
        self._http = http_client or httpx2.AsyncClient(timeout=self._timeout)

    @property
    def api_version(self) -> str:
        return self._api_version

    async def aclose(self) -> None:
        if self._owns_http_client:
            await self._http.aclose()

    async def __aenter__(self) -> MetaGraphClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send_events(
        self, pixel_id: str, access_token: str, body: dict[str, object]
    ) -> GraphSendResult:
        """POST `body` (`{"data": [...], "test_event_code"?: ...}`) to the pixel's events edge."""
        invalid = _check_call_arguments(pixel_id, access_token)
        if invalid is not None:
            return invalid
        payload = {key: value for key, value in body.items() if key != "access_token"}
        data = payload.get("data")
        event_count = len(data) if isinstance(data, list) else 0
        events = _event_fields(data)
        logger.info(
            "[metaCapiClient] Sending CAPI event",
            extra={
                "pixelId": pixel_id,
                "eventName": events["eventName"],
                "eventLevel": events["eventLevel"],
                "eventCount": event_count,
                "apiVersion": self._api_version,
                "testEventCode": "test_event_code" in payload,
            },
        )
        url = f"{self._base_url}/{self._api_version}/{pixel_id}/events"
        started = time.perf_counter()
        try:
            response = await self._http.post(
                url, json=payload, headers=_auth_headers(access_token), timeout=self._timeout
            )
        except httpx2.HTTPError as exc:
            error = _transport_error(exc, time.perf_counter() - started)
            metrics.observe_graph_request("events", error.kind.value, error.elapsed_seconds)
            _log_failure(pixel_id, error)
            return error
        elapsed = time.perf_counter() - started
        result = _send_result(response.status_code, response.content, access_token, elapsed)
        metrics.observe_graph_request("events", _outcome(result), elapsed, event_count)
        if isinstance(result, GraphSuccess):
            logger.info(
                "[metaCapiClient] CAPI event sent successfully",
                extra={
                    "pixelId": pixel_id,
                    "eventId": events["eventId"],
                    "eventsReceived": result.events_received,
                    "fbtrace_id": result.fbtrace_id,
                    "elapsedSeconds": round(elapsed, 4),
                },
            )
        else:
            _log_failure(pixel_id, result)
        return result

    async def check_token(self, pixel_id: str, access_token: str) -> TokenCheckResult:
        """Cheap probe: can this token read the pixel? GET `/{version}/{pixel_id}?fields=id`."""
        invalid = _check_call_arguments(pixel_id, access_token)
        if invalid is not None:
            return invalid
        url = f"{self._base_url}/{self._api_version}/{pixel_id}"
        started = time.perf_counter()
        try:
            response = await self._http.get(
                url,
                params={"fields": "id"},
                headers=_auth_headers(access_token),
                timeout=self._timeout,
            )
        except httpx2.HTTPError as exc:
            error = _transport_error(exc, time.perf_counter() - started)
            metrics.observe_graph_request("check_token", error.kind.value, error.elapsed_seconds)
            _log_failure(pixel_id, error)
            return error
        elapsed = time.perf_counter() - started
        result = _token_check_result(response.status_code, response.content, access_token, elapsed)
        metrics.observe_graph_request("check_token", _outcome(result), elapsed)
        if isinstance(result, MetaGraphError):
            _log_failure(pixel_id, result)
        return result


def _outcome(result: GraphSuccess | GraphObjectFound | MetaGraphError) -> str:
    """Metric label: "ok", or the failure kind."""
    return result.kind.value if isinstance(result, MetaGraphError) else "ok"


def _event_fields(data: object) -> dict[str, object]:
    """The seed's log fields (eventName, eventLevel, eventId) of a request's events: plain
    values for a one-event request, lists for a batch."""
    events = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    custom = [e.get("custom_data") for e in events]
    fields: dict[str, object] = {
        "eventName": [e.get("event_name") for e in events],
        "eventLevel": [c.get("event_level") if isinstance(c, dict) else None for c in custom],
        "eventId": [e.get("event_id") for e in events],
    }
    if len(events) == 1:
        return {key: value[0] for key, value in fields.items() if isinstance(value, list)}
    return fields


def _auth_headers(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}


def _check_call_arguments(pixel_id: str, access_token: str) -> MetaGraphError | None:
    """Local validation; such errors are permanent because the same input fails again."""
    if not _PIXEL_ID_PATTERN.fullmatch(pixel_id):
        return _local_error("pixel id must be numeric", hint="set the numeric pixel (dataset) id")
    if not access_token.strip():
        return _local_error("access token is empty", hint=hint_for(190, None))
    return None


def _local_error(message: str, *, hint: str | None) -> MetaGraphError:
    return MetaGraphError(
        message=message,
        type=None,
        code=None,
        error_subcode=None,
        error_user_msg=None,
        error_user_title=None,
        fbtrace_id=None,
        is_transient=False,
        http_status=None,
        hint=hint,
        raw_excerpt="",
        elapsed_seconds=0.0,
        kind=GraphFailureKind.INVALID_REQUEST,
    )


def _transport_error(exc: httpx2.HTTPError, elapsed: float) -> MetaGraphError:
    # Only the exception class name and its text: httpx messages carry no secrets (the token
    # is in a header, never in the URL).
    kind = (
        GraphFailureKind.TIMEOUT
        if isinstance(exc, httpx2.TimeoutException)
        else GraphFailureKind.NETWORK
    )
    return MetaGraphError(
        message=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
        type=None,
        code=None,
        error_subcode=None,
        error_user_msg=None,
        error_user_title=None,
        fbtrace_id=None,
        is_transient=classify_graph_error(None, None, None, None),
        http_status=None,
        hint=None,
        raw_excerpt="",
        elapsed_seconds=elapsed,
        kind=kind,
    )


def _excerpt(content: bytes, access_token: str) -> str:
    # Graph does not echo tokens, but a proxy error page might echo request headers. Redact
    # before cutting, so a token that straddles the cut cannot leave a prefix behind.
    text = content[:65536].decode("utf-8", errors="replace")
    return text.replace(access_token, _REDACTED)[:RAW_EXCERPT_CHARS]


def _parse_json_object(content: bytes) -> dict[str, object] | None:
    """The body as a JSON object, or None when it is empty, not JSON or not an object."""
    try:
        parsed: object = json.loads(content)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors.
        return None
    if not isinstance(parsed, dict):
        return None
    return {str(key): value for key, value in parsed.items()}


def _unexpected_body_error(
    http_status: int,
    content: bytes,
    access_token: str,
    elapsed: float,
    description: str,
    kind: GraphFailureKind,
) -> MetaGraphError:
    if not content.strip():
        description, kind = "an empty body", GraphFailureKind.MALFORMED_BODY
    return MetaGraphError(
        message=f"HTTP {http_status} with {description} from Graph API",
        type=None,
        code=None,
        error_subcode=None,
        error_user_msg=None,
        error_user_title=None,
        fbtrace_id=None,
        # Without a Graph error we cannot know the request failed for good (and for a 2xx,
        # that it was accepted); the event_id makes a resend safe.
        is_transient=classify_graph_error(http_status, None, None, None),
        http_status=http_status,
        hint=None,
        raw_excerpt=_excerpt(content, access_token),
        elapsed_seconds=elapsed,
        kind=kind,
    )


def _graph_error(
    http_status: int,
    envelope: dict[str, object],
    content: bytes,
    access_token: str,
    elapsed: float,
) -> MetaGraphError:
    code = _int_or_none(envelope.get("code"))
    subcode = _int_or_none(envelope.get("error_subcode"))
    transient_flag = envelope.get("is_transient")
    return MetaGraphError(
        message=_str_or_none(envelope.get("message")) or f"HTTP {http_status} Graph API error",
        type=_str_or_none(envelope.get("type")),
        code=code,
        error_subcode=subcode,
        error_user_msg=_str_or_none(envelope.get("error_user_msg")),
        error_user_title=_str_or_none(envelope.get("error_user_title")),
        fbtrace_id=_str_or_none(envelope.get("fbtrace_id")),
        is_transient=classify_graph_error(
            http_status,
            code,
            subcode,
            transient_flag if isinstance(transient_flag, bool) else None,
        ),
        http_status=http_status,
        hint=hint_for(code, subcode),
        raw_excerpt=_excerpt(content, access_token),
        elapsed_seconds=elapsed,
        kind=GraphFailureKind.GRAPH_ERROR,
    )


def _error_from_body(
    http_status: int,
    body: dict[str, object] | None,
    content: bytes,
    access_token: str,
    elapsed: float,
) -> MetaGraphError | None:
    """The error a response describes, or None when it is a 2xx JSON object without one."""
    if body is None:
        return _unexpected_body_error(
            http_status,
            content,
            access_token,
            elapsed,
            "a body that is not a JSON object",
            GraphFailureKind.MALFORMED_BODY,
        )
    envelope = body.get("error")
    if isinstance(envelope, dict):
        fields = {str(key): value for key, value in envelope.items()}
        return _graph_error(http_status, fields, content, access_token, elapsed)
    if not 200 <= http_status < 300:
        return _unexpected_body_error(
            http_status,
            content,
            access_token,
            elapsed,
            "a JSON body without a Graph error",
            GraphFailureKind.HTTP_STATUS,
        )
    return None


def _send_result(
    http_status: int, content: bytes, access_token: str, elapsed: float
) -> GraphSendResult:
    body = _parse_json_object(content)
    error = _error_from_body(http_status, body, content, access_token, elapsed)
    if error is not None:
        return error
    assert body is not None  # _error_from_body returns an error for a None body.
    events_received = body.get("events_received")
    # bool is an int subclass; `true` is not a count.
    if not isinstance(events_received, int) or isinstance(events_received, bool):
        return _unexpected_body_error(
            http_status,
            content,
            access_token,
            elapsed,
            "a body without events_received",
            GraphFailureKind.MALFORMED_BODY,
        )
    messages = body.get("messages")
    return GraphSuccess(
        events_received=events_received,
        messages=tuple(str(m) for m in messages) if isinstance(messages, list) else (),
        fbtrace_id=_str_or_none(body.get("fbtrace_id")),
        raw=body,
        elapsed_seconds=elapsed,
    )


def _token_check_result(
    http_status: int, content: bytes, access_token: str, elapsed: float
) -> TokenCheckResult:
    body = _parse_json_object(content)
    error = _error_from_body(http_status, body, content, access_token, elapsed)
    if error is not None:
        return error
    assert body is not None
    object_id = body.get("id")
    if not isinstance(object_id, str | int) or isinstance(object_id, bool):
        return _unexpected_body_error(
            http_status,
            content,
            access_token,
            elapsed,
            "a body without id",
            GraphFailureKind.MALFORMED_BODY,
        )
    return GraphObjectFound(object_id=str(object_id), raw=body, elapsed_seconds=elapsed)


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _log_failure(pixel_id: str, error: MetaGraphError) -> None:
    # message/title come from Graph and describe the request, never the user data; the raw
    # excerpt stays out of the log (it goes to the audit table only).
    logger.warning(
        "[metaCapiClient] CAPI request failed",
        extra={
            "pixelId": pixel_id,
            "failureKind": error.kind.value,
            "httpStatus": error.http_status,
            "errorCode": error.code,
            "errorSubcode": error.error_subcode,
            "errorMessage": error.message,
            "isTransient": error.is_transient,
            "fbtrace_id": error.fbtrace_id,
            "elapsedSeconds": round(error.elapsed_seconds, 4),
        },
    )
