"""MetaGraphClient against the fake Graph server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest

from capi_server.adapters.meta_graph import (
    GraphFailureKind,
    GraphObjectFound,
    GraphSuccess,
    MetaGraphClient,
    MetaGraphError,
    classify_graph_error,
    hint_for,
)
from tests.fakes.graph import (
    FakeGraph,
    error_fixture,
    error_fixture_entries,
    shared_fixtures_dir,
)
from tests.fakes.http import FakeResponse, RecordedRequest

PIXEL_ID = "1234567890123456"
TOKEN = "EAAGtestTOKEN0123456789secret"

# Fixture entries without a body name codes only; these are the bodies we serve for them.
_CODES_OF_BODYLESS_FIXTURES = {
    "app_limit_341_or_policy_block_368": [341, 368],
    "codes_613_80004_32": [613, 80004, 32],
}


def _event(event_id: str = "lead-1:LeadSubmitted") -> dict[str, Any]:
    return {
        "event_name": "LeadSubmitted",
        "event_time": 1_760_000_000,
        "event_id": event_id,
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "user_data": {"ctwa_clid": "Aff-n8ZTODiE79d22KtAwQKj9e", "ph": ["ab" * 32]},
    }


def _body(*events: dict[str, Any]) -> dict[str, object]:
    return {"data": list(events) or [_event()]}


def _graph_error_body(code: int, **extra: Any) -> dict[str, Any]:
    return {
        "error": {"message": f"(#{code}) error", "type": "OAuthException", "code": code, **extra}
    }


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def started_graph() -> Iterator[FakeGraph]:
    # One server per module: stopping one costs ~0.5 s (see FakeGraph.reset).
    with FakeGraph() as fake:
        yield fake


@pytest.fixture
def graph(started_graph: FakeGraph) -> FakeGraph:
    started_graph.reset()
    return started_graph


@pytest.fixture
async def client(graph: FakeGraph) -> AsyncIterator[MetaGraphClient]:
    async with MetaGraphClient(graph.base_url, read_timeout_seconds=1.0) as graph_client:
        yield graph_client


def _as_error(result: object) -> MetaGraphError:
    assert isinstance(result, MetaGraphError), result
    return result


# -- success ---------------------------------------------------------------------------------


async def test_success_is_parsed_and_the_events_reach_the_events_edge(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    result = await client.send_events(
        PIXEL_ID, TOKEN, _body(_event("a:LeadSubmitted"), _event("b:LeadSubmitted"))
    )

    assert isinstance(result, GraphSuccess)
    assert result.events_received == 2
    assert result.messages == ()
    assert result.fbtrace_id is not None and result.fbtrace_id.startswith("FakeGraphTrace")
    assert result.elapsed_seconds > 0
    [post] = graph.posts()
    assert post.path == f"/v25.0/{PIXEL_ID}/events"
    assert [e["event_id"] for e in graph.events()] == ["a:LeadSubmitted", "b:LeadSubmitted"]


async def test_success_fixture_body_is_parsed(graph: FakeGraph, client: MetaGraphClient) -> None:
    fixture = (shared_fixtures_dir() / "meta_capi" / "success_response.json").read_text()
    success = json.loads(fixture)
    graph.script([FakeResponse(success["http_status"], success["body"])])

    result = await client.send_events(PIXEL_ID, TOKEN, _body())

    assert result == GraphSuccess(
        events_received=1,
        messages=(),
        fbtrace_id="AYZhpp4scrUfVIWcEWJ7NmN",
        raw=success["body"],
        elapsed_seconds=result.elapsed_seconds,
    )


async def test_success_without_messages_field_is_still_success(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    # RudderStack's mock omits `messages`.
    graph.script([FakeResponse(200, {"events_received": 1, "fbtrace_id": "t"})])

    result = await client.send_events(PIXEL_ID, TOKEN, _body())

    assert isinstance(result, GraphSuccess)
    assert result.events_received == 1 and result.messages == ()


async def test_api_version_is_configurable(graph: FakeGraph) -> None:
    graph.api_version = "v24.0"
    async with MetaGraphClient(graph.base_url, api_version="v24.0") as graph_client:
        result = await graph_client.send_events(PIXEL_ID, TOKEN, _body())

    assert isinstance(result, GraphSuccess)
    assert graph.posts()[0].path == f"/v24.0/{PIXEL_ID}/events"


def test_malformed_api_version_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="api_version"):
        MetaGraphClient("http://127.0.0.1:1", api_version="25")


# -- the access token ------------------------------------------------------------------------


async def test_token_travels_only_in_the_authorization_header(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    body = _body()
    body["access_token"] = TOKEN  # a caller's leftover must not reach the body

    await client.send_events(PIXEL_ID, TOKEN, body)
    await client.check_token(PIXEL_ID, TOKEN)

    assert graph.tokens() == [TOKEN, TOKEN]
    for request in graph.requests:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in request.path
        assert "access_token" not in request.query
        assert TOKEN not in str(request.query)
        assert TOKEN.encode() not in request.body
    assert "access_token" not in graph.posts()[0].json()


async def test_token_and_user_data_never_reach_the_log(
    graph: FakeGraph, client: MetaGraphClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="capi_server.meta_graph")
    graph.fail_next_with_fixture("token_expired_190_463")

    await client.send_events(PIXEL_ID, TOKEN, _body())
    await client.send_events(PIXEL_ID, TOKEN, _body())

    messages = [r.getMessage() for r in caplog.records]
    assert "[metaCapiClient] Sending CAPI event" in messages
    assert "[metaCapiClient] CAPI event sent successfully" in messages
    assert "[metaCapiClient] CAPI request failed" in messages
    sent = next(r for r in caplog.records if r.getMessage().endswith("sent successfully"))
    assert sent.__dict__["eventsReceived"] == 1 and sent.__dict__["pixelId"] == PIXEL_ID
    dumped = " ".join(str(record.__dict__) for record in caplog.records)
    assert TOKEN not in dumped
    assert "Aff-n8ZTODiE79d22KtAwQKj9e" not in dumped
    assert "ab" * 32 not in dumped


async def test_token_echoed_by_an_error_page_is_redacted_from_the_excerpt(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    def echo_headers(request: RecordedRequest) -> FakeResponse:
        return FakeResponse(502, f"<html>proxy error; headers: {request.headers}</html>")

    graph.set_handler(echo_headers)

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert TOKEN not in error.raw_excerpt
    assert "[REDACTED]" in error.raw_excerpt


# -- Graph error bodies ----------------------------------------------------------------------


def _fixture_cases() -> list[Any]:
    cases = []
    for entry in error_fixture_entries():
        name, body = entry["name"], entry["body"]
        if isinstance(body, dict):
            cases.append(
                pytest.param(entry["http_status"] or 400, body, entry["retryable"], id=name)
            )
        elif isinstance(body, str):  # the HTML page
            cases.append(
                pytest.param(entry["http_status"] or 500, body, entry["retryable"], id=name)
            )
        else:
            for code in _CODES_OF_BODYLESS_FIXTURES[name]:
                cases.append(
                    pytest.param(
                        400, _graph_error_body(code), entry["retryable"], id=f"{name}-{code}"
                    )
                )
    return cases


@pytest.mark.parametrize(("http_status", "body", "retryable"), _fixture_cases())
async def test_every_fixture_error_is_classified_as_its_retryable_flag(
    graph: FakeGraph,
    client: MetaGraphClient,
    http_status: int,
    body: dict[str, Any] | str,
    retryable: bool,
) -> None:
    graph.script([FakeResponse(http_status, body)])

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_transient is retryable
    assert error.is_permanent is (not retryable)
    assert error.http_status == http_status
    assert error.raw_excerpt  # kept for the audit log
    if isinstance(body, dict):
        assert error.kind is GraphFailureKind.GRAPH_ERROR
        assert error.code == body["error"]["code"]
        assert error.error_subcode == body["error"].get("error_subcode")
        assert error.fbtrace_id == body["error"].get("fbtrace_id")
        assert error.message == body["error"]["message"]


def test_fixture_table_covers_every_entry() -> None:
    # Guards the parametrisation above against a fixture entry silently dropped.
    names = {entry["name"] for entry in error_fixture_entries()}
    assert len(_fixture_cases()) >= len(names) >= 15


async def test_fields_of_the_graph_error_envelope_are_kept(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    graph.fail_next_with_fixture("event_time_too_old")

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.type == "OAuthException"
    assert error.code == 100 and error.error_subcode == 2804003
    assert error.error_user_title == "Event Timestamp Too Old"
    assert error.error_user_msg is not None and "7 days" in error.error_user_msg
    assert error.hint == "event_time is older than 7 days; such events cannot be sent any more"
    assert error.is_permanent


async def test_permanent_code_wins_over_a_5xx_status(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    # RudderStack's mock answers the 190 "could not be decrypted" error with HTTP 500.
    graph.fail_next_with_fixture("access_token_could_not_be_decrypted", status=500)

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.http_status == 500 and error.code == 190
    assert error.is_permanent


async def test_is_transient_true_overrides_a_permanent_code(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    graph.fail_next(400, _graph_error_body(100, error_subcode=2804003, is_transient=True))

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_transient


# -- broken answers and the network: transient, never an exception ---------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        pytest.param(
            502,
            "<html><body>502 Bad Gateway</body></html>",
            GraphFailureKind.MALFORMED_BODY,
            id="html-502",
        ),
        pytest.param(200, b"", GraphFailureKind.MALFORMED_BODY, id="empty-200"),
        pytest.param(
            200,
            b'{"events_received": 1, "mess',
            GraphFailureKind.MALFORMED_BODY,
            id="truncated-json-200",
        ),
        pytest.param(200, b"[1, 2]", GraphFailureKind.MALFORMED_BODY, id="json-array-200"),
        pytest.param(
            200, {"fbtrace_id": "t"}, GraphFailureKind.MALFORMED_BODY, id="200-without-count"
        ),
        pytest.param(503, b"", GraphFailureKind.MALFORMED_BODY, id="empty-503"),
        pytest.param(429, {"detail": "slow down"}, GraphFailureKind.HTTP_STATUS, id="json-429"),
    ],
)
async def test_unusable_answers_are_transient_errors(
    graph: FakeGraph,
    client: MetaGraphClient,
    status: int,
    body: bytes | str | dict[str, Any],
    kind: GraphFailureKind,
) -> None:
    graph.script([FakeResponse(status, body, headers={"Content-Type": "application/json"})])

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_transient
    assert error.kind is kind
    assert error.http_status == status
    assert error.code is None
    assert f"HTTP {status}" in error.message


async def test_connection_refused_is_a_transient_network_error() -> None:
    async with MetaGraphClient(f"http://127.0.0.1:{_closed_port()}") as graph_client:
        error = _as_error(await graph_client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_transient
    assert error.kind is GraphFailureKind.NETWORK
    assert error.http_status is None
    assert error.message.startswith("ConnectError")


async def test_read_timeout_is_a_transient_timeout_error(graph: FakeGraph) -> None:
    graph.set_delay(0.6)
    async with MetaGraphClient(graph.base_url, read_timeout_seconds=0.2) as graph_client:
        error = _as_error(await graph_client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_transient
    assert error.kind is GraphFailureKind.TIMEOUT
    assert 0.2 <= error.elapsed_seconds < 0.6
    assert len(graph.posts()) == 1  # the request did reach Graph; the event_id covers a resend


async def test_slow_answer_within_the_timeout_succeeds_and_is_timed(graph: FakeGraph) -> None:
    graph.set_delay(0.15)
    async with MetaGraphClient(graph.base_url, read_timeout_seconds=1.0) as graph_client:
        result = await graph_client.send_events(PIXEL_ID, TOKEN, _body())

    assert isinstance(result, GraphSuccess)
    assert result.elapsed_seconds >= 0.15


# -- local validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel_id", "token"),
    [("123/../me", TOKEN), ("", TOKEN), ("123?x=1", TOKEN), (PIXEL_ID, ""), (PIXEL_ID, "  ")],
)
async def test_bad_pixel_id_or_empty_token_is_permanent_and_sends_nothing(
    graph: FakeGraph, client: MetaGraphClient, pixel_id: str, token: str
) -> None:
    error = _as_error(await client.send_events(pixel_id, token, _body()))

    assert error.is_permanent
    assert error.kind is GraphFailureKind.INVALID_REQUEST
    assert graph.requests == []


# -- check_token -----------------------------------------------------------------------------


async def test_check_token_with_a_valid_token_finds_the_pixel(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    result = await client.check_token(PIXEL_ID, TOKEN)

    assert isinstance(result, GraphObjectFound)
    assert result.object_id == PIXEL_ID
    [request] = graph.requests
    assert request.method == "GET"
    assert request.path == f"/v25.0/{PIXEL_ID}"
    assert request.query == {"fields": ["id"]}


async def test_check_token_with_an_invalid_token_is_a_permanent_190(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    graph.invalidate_token("EAAGrevoked")

    error = _as_error(await client.check_token(PIXEL_ID, "EAAGrevoked"))

    assert error.code == 190 and error.error_subcode == 463
    assert error.is_permanent
    assert error.hint is not None and "ad_accounts.access_token" in error.hint


async def test_invalid_token_fails_sends_too(graph: FakeGraph, client: MetaGraphClient) -> None:
    graph.invalidate_token("EAAGrevoked")

    error = _as_error(await client.send_events(PIXEL_ID, "EAAGrevoked", _body()))

    assert error.code == 190 and error.is_permanent
    assert graph.events() == [_event()]  # recorded, though Graph refused it


async def test_check_token_network_failure_is_transient() -> None:
    async with MetaGraphClient(f"http://127.0.0.1:{_closed_port()}") as graph_client:
        error = _as_error(await graph_client.check_token(PIXEL_ID, TOKEN))

    assert error.is_transient and error.kind is GraphFailureKind.NETWORK


# -- the shared HTTP client ------------------------------------------------------------------


async def test_an_injected_http_client_is_used_and_left_open(graph: FakeGraph) -> None:
    async with httpx2.AsyncClient() as http_client:
        graph_client = MetaGraphClient(graph.base_url, http_client=http_client)
        result = await graph_client.send_events(PIXEL_ID, TOKEN, _body())
        await graph_client.aclose()

        assert isinstance(result, GraphSuccess)
        assert not http_client.is_closed


async def test_scripted_answers_come_in_order_then_defaults_resume(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    graph.fail_next(503)
    graph.fail_next_with_fixture("user_request_limit_reached")

    first = await client.send_events(PIXEL_ID, TOKEN, _body())
    second = await client.send_events(PIXEL_ID, TOKEN, _body())
    third = await client.send_events(PIXEL_ID, TOKEN, _body())

    assert _as_error(first).http_status == 503 and _as_error(first).code == 1
    assert _as_error(second).code == 17 and _as_error(second).is_transient
    assert isinstance(third, GraphSuccess)
    assert len(graph.events()) == 3


# -- pure classification and hints -----------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "code", "subcode", "flag", "transient"),
    [
        (None, None, None, None, True),  # network error / timeout
        (500, None, None, None, True),
        (502, None, None, None, True),
        (429, None, None, None, True),
        (200, None, None, None, True),  # 2xx with an unparseable body
        *[(400, code, None, None, True) for code in (1, 2, 4, 17, 341, 368, 613, 80003, 80004)],
        (400, 21009, None, None, True),
        (400, 99999, None, None, True),  # unknown code
        (400, 100, None, None, False),
        (400, 100, 2804003, False, False),
        (400, 100, 2804066, False, False),
        (400, 100, 33, None, False),
        (400, 3, 10, None, False),
        (400, 105, None, None, False),
        (400, 190, 460, None, False),
        (400, 190, 463, None, False),
        (400, 190, 467, None, False),
        (500, 190, None, None, False),  # the code decides, not the status
        (403, 10, None, None, False),
        (403, 200, None, None, False),
        (403, 299, None, None, False),
        (400, 300, None, None, True),  # just past the permission range: unknown
        (400, 100, 2804003, True, True),  # is_transient=true overrides
        (400, 190, None, True, True),
        (400, 17, None, False, True),  # is_transient=false does not make a throttle permanent
    ],
)
def test_classify_graph_error(
    http_status: int | None,
    code: int | None,
    subcode: int | None,
    flag: bool | None,
    transient: bool,
) -> None:
    assert classify_graph_error(http_status, code, subcode, flag) is transient


def test_hints_for_the_errors_operators_must_fix() -> None:
    assert hint_for(190, None) == (
        "refresh the access token of the ad account (ad_accounts.access_token) "
        "or the user account (user_accounts.access_token)"
    )
    assert "expired" in (hint_for(190, 463) or "")
    assert hint_for(100, None) == (
        "check that the pixel exists and that the token's user has access to it; "
        "(#100) Invalid parameter: check the event data"
    )
    hint_2804066 = hint_for(100, 2804066) or ""
    assert "business_messaging" in hint_2804066
    assert "LeadSubmitted" in hint_2804066 and "QualifiedLead" in hint_2804066
    assert "7 days" in (hint_for(100, 2804003) or "")
    for permission_code in (10, 200, 250, 299):
        assert "ads_management" in (hint_for(permission_code, None) or "")
        assert "page_events" in (hint_for(permission_code, None) or "")
    assert hint_for(None, None) is None
    assert hint_for(99999, None) is None


async def test_2804066_from_graph_carries_the_preset_hint(
    graph: FakeGraph, client: MetaGraphClient
) -> None:
    graph.fail_next(400, error_fixture("business_messaging_invalid_event_type"))

    error = _as_error(await client.send_events(PIXEL_ID, TOKEN, _body()))

    assert error.is_permanent
    assert error.error_user_title == "Messaging Event Invalid Event Type"
    assert error.hint == hint_for(100, 2804066)
