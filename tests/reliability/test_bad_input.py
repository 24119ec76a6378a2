"""Bad input: property-based requests on every RPC and on the raw webhook parsers.

For every RPC of every service, hypothesis builds requests from the message descriptors
with random values (odd and huge strings, NULs, random ids and enum numbers, out-of-range
timestamps, random bytes), sends them to the in-process server (SQLite and PostgreSQL,
each on a fresh database) and checks: the answer is OK or an error other than
INTERNAL/UNKNOWN, the server stays SERVING, and an INVALID_ARGUMENT answer changed no row.
CI runs CAPI_FUZZ_EXAMPLES (default 30) examples per RPC and backend; `make soak` runs 300.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from capi.v1 import settings_service_pb2_grpc
from capi_server.domain.crm import InvalidCrmWebhook, parse_crm_webhook
from capi_server.domain.whatsapp_webhooks import InvalidWebhook, parse_whatsapp_webhook
from capi_server.rpc.app import SERVICE_NAMES
from tests.conftest import Stubs, _migrate, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import shared_fixtures_dir
from tests.reliability.conftest import soak_enabled
from tests.reliability.support import fresh_pg_database, sync_engine, table_counts

T = TypeVar("T")

EXAMPLES = int(os.environ.get("CAPI_FUZZ_EXAMPLES") or (300 if soak_enabled() else 30))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


# -- the server in a background thread (hypothesis drives sync tests) ---------------------


class UnhandledErrors(logging.Handler):
    """Keeps the exception text of the interceptor's "unhandled error" records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"


# Every defect the fuzz found is fixed; an INTERNAL answer now fails the test.
KNOWN_DEFECTS: dict[str, str] = {}


def known_defect(error_text: str) -> str | None:
    return next((name for name, sign in KNOWN_DEFECTS.items() if sign in error_text), None)


class ThreadedServer:
    """The in-process server on its own event loop thread, with a sync channel to it."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stubs: Stubs = self.run(
            start_stubs(make_settings(database_url, llm_timeout_seconds=2.0))
        )
        self.channel = grpc.insecure_channel(self.stubs.target)
        self.known: dict[str, str] = {}
        self.backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
        # The exception behind each INTERNAL answer, to tell known defects from new ones.
        self.unhandled = UnhandledErrors()
        logging.getLogger("capi_server.rpc").addHandler(self.unhandled)
        self.known_defects: Counter[str] = Counter()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def serving(self) -> bool:
        stub: Any = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        logging.getLogger("capi_server.rpc").removeHandler(self.unhandled)
        self.channel.close()
        self.run(stop_stubs(self.stubs))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def seed_data(server: ThreadedServer) -> None:
    """One account, ad account and direction, so random ids sometimes hit real rows."""
    stub: Any = settings_service_pb2_grpc.SettingsServiceStub(server.channel)
    account = stub.CreateUserAccount(
        setpb.CreateUserAccountRequest(
            user_account=res.UserAccount(name="Fuzz", access_token="EAAB-fuzz", default_region="KZ")
        )
    ).user_account
    direction = stub.CreateDirection(
        setpb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account.id,
                name="Fuzz",
                instance_name="fuzz-instance",
                pixel_id="1234567890",
                capi=res.CapiSettings(enabled=True, source=res.CAPI_SOURCE_WHATSAPP),
            )
        )
    ).direction
    server.known = {
        "account": account.id,
        "direction": direction.id,
        "instance": "fuzz-instance",
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
        _migrate(url)
        running = ThreadedServer(url)
        seed_data(running)
        yield running
        running.close()
    else:
        with fresh_pg_database("capi_fuzz") as url:
            running = ThreadedServer(url)
            seed_data(running)
            yield running
            running.close()


@pytest.fixture(scope="module")
def engine(server: ThreadedServer) -> Iterator[Engine]:
    with sync_engine(server.database_url) as eng:
        yield eng


# -- request strategies from descriptors ----------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

ODD_STRINGS = [
    "",
    " ",
    "0",
    "-1",
    "1",
    "2",
    "999999999999999999",
    "9223372036854775808",
    "99999999999999999999999999",
    "1e3",
    "٣",  # an Arabic-Indic digit: str.isdigit() is True
    "\x00",
    "a\x00b",
    "+7 701 123 45 67",
    "+0000000000000",
    "@",
    "a@b.co",
    "leads[update][0][id]",
    "' OR 1=1 --",
    "\ud7ff\ue000\U0010ffff",
    "https://x.amocrm.ru",
    "http://127.0.0.1:9/rest/1/code/",
]


def string_strategy(known: dict[str, str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(ODD_STRINGS + list(known.values())),
        st.from_regex(r"[0-9]{1,25}", fullmatch=True),
        st.text(min_size=1000, max_size=5000),
        st.integers(min_value=10_000, max_value=300_000).map(lambda n: "x" * n),
    )


def value_strategy(
    field: FieldDescriptor, known: dict[str, str], depth: int
) -> st.SearchStrategy[Any] | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return string_strategy(known)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=3000),
            string_strategy(known).map(lambda s: s.encode("utf-8", "surrogateescape")),
        )
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.integers(-3, 12), st.integers(-(2**31), 2**31 - 1))
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.one_of(st.integers(-3, 600), st.integers(low, high))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 3:
            return None
        assert field.message_type is not None
        return message_strategy(field.message_type, known, depth + 1)
    return None


def message_strategy(
    descriptor: Descriptor, known: dict[str, str], depth: int = 0
) -> st.SearchStrategy[dict[str, Any]]:
    if descriptor.full_name == "google.protobuf.Timestamp":
        # Mostly valid Timestamps, sometimes out of protobuf's range (INVALID_ARGUMENT).
        return st.fixed_dictionaries(
            {
                "seconds": st.one_of(
                    st.integers(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS),
                    st.integers(1_700_000_000, 1_900_000_000),
                    st.integers(-(2**62), 2**62),
                ),
                "nanos": st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)),
            }
        )
    if descriptor.full_name == "google.protobuf.FieldMask":
        names = st.one_of(st.text(max_size=20), st.sampled_from(_all_field_names()))
        return st.fixed_dictionaries({"paths": st.lists(names, max_size=4)})
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        strategy = value_strategy(field, known, depth)
        if strategy is None:
            continue
        if field.is_repeated:
            strategy = st.lists(strategy, max_size=3)
        optional[field.name] = strategy
    return st.fixed_dictionaries({}, optional=optional)


def _all_field_names() -> list[str]:
    names: set[str] = set()
    for message in (res.Direction, res.CapiSettings, res.UserAccount, res.CrmConnection):
        for field in message.DESCRIPTOR.fields:
            names.add(field.name)
            names.add(f"capi.{field.name}")
    return sorted(names)


def build(message_cls: type[Message], values: dict[str, Any]) -> Message:
    """A message from nested values; values a field rejects (e.g. out-of-range Timestamp
    nanos are fine on the wire) are set as they come, since protobuf checks only types."""
    message = message_cls()
    _fill(message, values)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    descriptor = message.DESCRIPTOR
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                container: Any = getattr(message, name)
                for item in value:
                    _fill(container.add(), item)
            else:
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


def rpc_methods() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for s in SERVICE_NAMES for m in pool.FindServiceByName(s).methods]


def caller(server: ThreadedServer, method: MethodDescriptor) -> Callable[[Message], Any]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    return server.channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )


def check_call(
    server: ThreadedServer, engine: Engine, call: Callable[..., Any], request: Message
) -> grpc.StatusCode:
    before = table_counts(engine)
    code = grpc.StatusCode.OK
    try:
        call(request, timeout=60)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INTERNAL:
            defect = known_defect(server.unhandled.last)
            if defect is not None:
                server.known_defects[defect] += 1
                return code
        assert code not in FORBIDDEN, (
            code,
            exc.details(),
            server.unhandled.last[:500],
            str(request)[:2000],
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert table_counts(engine) == before, str(request)[:2000]
    return code


# -- every RPC ------------------------------------------------------------------------------

METHODS = rpc_methods()


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_random_requests_never_crash_or_half_write(
    server: ThreadedServer, engine: Engine, method: MethodDescriptor
) -> None:
    """Proves, for this RPC: random requests are answered OK or with an error other than
    INTERNAL/UNKNOWN, INVALID_ARGUMENT answers leave every table's row count unchanged,
    and the server is SERVING afterwards."""
    call = caller(server, method)
    request_cls = message_factory.GetMessageClass(method.input_type)

    @FUZZ
    @given(values=message_strategy(method.input_type, server.known))
    def run(values: dict[str, Any]) -> None:
        check_call(server, engine, call, build(request_cls, values))

    run()
    assert server.serving()


# -- raw webhook bodies ---------------------------------------------------------------------


def _evolution_fixtures() -> list[dict[str, Any]]:
    folder = shared_fixtures_dir() / "evolution"
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(ODD_STRINGS),
)


def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    )


JSON_VALUE = st.recursive(JSON_LEAF, _json_containers, max_leaves=12)


@st.composite
def mutated_evolution(draw: st.DrawFn) -> str:
    """A real Evolution webhook with random leaves replaced or removed, maybe truncated."""
    document = json.loads(json.dumps(draw(st.sampled_from(_evolution_fixtures()))))
    for _ in range(draw(st.integers(1, 6))):
        node: Any = document
        while isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], dict) or draw(st.booleans()):
                action = draw(st.sampled_from(["replace", "delete"]))
                if action == "delete":
                    del node[key]
                else:
                    node[key] = draw(JSON_VALUE)
                break
            node = node[key]
    text_ = json.dumps(document, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        text_ = text_[: draw(st.integers(0, len(text_)))]
    return text_


RAW_EVOLUTION = st.one_of(
    mutated_evolution(),
    JSON_VALUE.map(json.dumps),
    st.text(max_size=200),
    st.just("{" * 5000),
    st.just('{"event": "messages.upsert", "data": ' + "[" * 3000 + "]" * 3000 + "}"),
    st.just(json.dumps({"event": "messages.upsert", "pad": "x" * (1024 * 1024 + 10)})),
)

FORM_KEYS = st.one_of(
    st.sampled_from(
        [
            "leads[update][0][id]",
            "leads[status][0][id]",
            "leads[add][0][id]",
            "contacts[update][0][id]",
            "leads[delete][0][id]",
            "account[subdomain]",
            "account[id]",
            "event",
            "data[FIELDS][ID]",
            "auth[domain]",
            "auth[application_token]",
            "auth[member_id]",
            "ts",
            "leads[update][]",
            "leads",
            "tasks[add][0][id]",
        ]
    ),
    st.text(max_size=20),
)
FORM_VALUES = st.one_of(
    st.sampled_from(["ONCRMDEALUPDATE", "ONCRMLEADADD", "onCrmContactUpdate", "1", "42"]),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=20),
)


@st.composite
def crm_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["form", "json", "bytes", "huge"]))
    if kind == "form":
        from urllib.parse import urlencode

        pairs = draw(st.lists(st.tuples(FORM_KEYS, FORM_VALUES), max_size=8))
        body = urlencode(pairs).encode()
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]
        return body
    if kind == "json":
        return json.dumps(
            draw(st.dictionaries(FORM_KEYS, st.one_of(FORM_VALUES, JSON_VALUE), max_size=6))
        ).encode()
    if kind == "huge":
        return b"leads[update][0][id]=1&pad=" + b"x" * (256 * 1024)
    return draw(st.binary(max_size=500))


CONTENT_TYPES = st.one_of(
    st.sampled_from(["", "application/json", "application/x-www-form-urlencoded"]),
    st.text(max_size=30),
)


def test_evolution_webhook_parser_raises_only_invalid_webhook() -> None:
    """Proves the Evolution/Cloud API parser answers any text with parsed messages or
    InvalidWebhook, never another exception (which the RPC would turn into INTERNAL)."""

    @FUZZ
    @given(raw=RAW_EVOLUTION)
    def run(raw: str) -> None:
        with contextlib.suppress(InvalidWebhook):
            parse_whatsapp_webhook(raw)

    run()


def test_crm_webhook_parser_raises_only_invalid_crm_webhook() -> None:
    """Proves the amoCRM/Bitrix24 parser answers any bytes (form, JSON, binary, oversized,
    truncated) with a CrmWebhook or InvalidCrmWebhook, never another exception."""

    @FUZZ
    @given(body=crm_body(), content_type=CONTENT_TYPES)
    def run(body: bytes, content_type: str) -> None:
        with contextlib.suppress(InvalidCrmWebhook):
            parse_crm_webhook(body, content_type)

    run()


def test_raw_evolution_events_through_ingest_message(
    server: ThreadedServer, engine: Engine
) -> None:
    """Proves IngestMessage with mutated, truncated, deeply nested and oversized Evolution
    webhooks answers OK or a clean error, INVALID_ARGUMENT without any row change."""
    stub: Any = server.channel.unary_unary(
        "/capi.v1.QualificationService/IngestMessage",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    from capi.v1 import qualification_service_pb2 as qpb

    @FUZZ
    @given(raw=RAW_EVOLUTION, by_id=st.booleans())
    def run(raw: str, by_id: bool) -> None:
        request = qpb.IngestMessageRequest(raw_evolution_event=raw)
        if by_id:
            request.direction_id = server.known["direction"]
        else:
            request.instance_name = server.known["instance"]
        check_call(server, engine, stub, request)

    run()
    assert server.serving()


def test_crm_webhook_bodies_through_handle_crm_webhook(
    server: ThreadedServer, engine: Engine
) -> None:
    """Proves HandleCrmWebhook with random amoCRM/Bitrix24 form and JSON bodies, random
    bytes (invalid UTF-8) and bodies above the 256 KiB limit answers OK or a clean error,
    INVALID_ARGUMENT without any row change."""
    from capi.v1 import qualification_service_pb2 as qpb

    stub: Any = server.channel.unary_unary(
        "/capi.v1.QualificationService/HandleCrmWebhook",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )

    @FUZZ
    @given(
        body=crm_body(),
        content_type=CONTENT_TYPES,
        connection=st.sampled_from(["", "1", "999999"]),
    )
    def run(body: bytes, content_type: str, connection: str) -> None:
        request = qpb.HandleCrmWebhookRequest(
            body=body, content_type=content_type, crm_connection_id=connection
        )
        check_call(server, engine, stub, request)

    run()
    assert server.serving()


def test_oversized_request_is_refused_and_server_keeps_serving(server: ThreadedServer) -> None:
    """Proves a request above the 4 MiB gRPC receive limit is refused with
    RESOURCE_EXHAUSTED and the server keeps serving."""
    from capi.v1 import qualification_service_pb2 as qpb

    stub: Any = server.channel.unary_unary(
        "/capi.v1.QualificationService/IngestMessage",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        stub(qpb.IngestMessageRequest(text="x" * (5 * 1024 * 1024)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.serving()


# -- out-of-range Timestamps ----------------------------------------------------------------

TIMESTAMP_CASES = {
    "IngestMessage.sent_at": lambda known, ts: (
        "/capi.v1.QualificationService/IngestMessage",
        _qpb().IngestMessageRequest(
            direction_id=known["direction"],
            contact_phone="+77011234567",
            message_id="ts-fuzz",
            text="hello",
            sent_at=ts,
        ),
    ),
    "SendConversion.event_time": lambda known, ts: (
        "/capi.v1.CapiSenderService/SendConversion",
        _spb().SendConversionRequest(
            instance_name=known["instance"], contact_phone="+77011234567", level=1, event_time=ts
        ),
    ),
    "ListEvents.start_time": lambda known, ts: (
        "/capi.v1.CapiSenderService/ListEvents",
        _spb().ListEventsRequest(start_time=ts),
    ),
    "ListEvents.end_time": lambda known, ts: (
        "/capi.v1.CapiSenderService/ListEvents",
        _spb().ListEventsRequest(end_time=ts),
    ),
    "ReconcileCrm.since": lambda known, ts: (
        "/capi.v1.QualificationService/ReconcileCrm",
        _qpb().ReconcileCrmRequest(crm_connection_id="1", since=ts),
    ),
}


def _qpb() -> Any:
    from capi.v1 import qualification_service_pb2

    return qualification_service_pb2


def _spb() -> Any:
    from capi.v1 import capi_sender_service_pb2

    return capi_sender_service_pb2


@pytest.mark.parametrize("bad", ["negative-nanos", "before-year-1", "after-year-9999"])
@pytest.mark.parametrize("case", sorted(TIMESTAMP_CASES))
def test_out_of_range_timestamps_are_invalid_argument(
    server: ThreadedServer, case: str, bad: str
) -> None:
    """Proves a Timestamp outside protobuf's valid range (negative nanos, before year 1,
    after year 9999) is answered INVALID_ARGUMENT naming the field, not INTERNAL."""
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = {
        "negative-nanos": Timestamp(seconds=1_800_000_000, nanos=-1),
        "before-year-1": Timestamp(seconds=MIN_TIMESTAMP_SECONDS - 1),
        "after-year-9999": Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1),
    }[bad]
    path, request = TIMESTAMP_CASES[case](server.known, ts)
    call: Any = server.channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert server.serving()


# -- known defects, pinned ------------------------------------------------------------------

NUL_CASES: dict[str, Callable[[dict[str, str]], tuple[str, Message]]] = {
    "GetDialogStatus.instance_name": lambda known: (
        "/capi.v1.CapiSenderService/GetDialogStatus",
        _spb().GetDialogStatusRequest(instance_name="\x00", contact_phone="+77011234567"),
    ),
    "SendConversion.instance_name": lambda known: (
        "/capi.v1.CapiSenderService/SendConversion",
        _spb().SendConversionRequest(instance_name="a\x00", contact_phone="+77011234567", level=1),
    ),
    "SendConversion.test_event_code": lambda known: (
        "/capi.v1.CapiSenderService/SendConversion",
        _spb().SendConversionRequest(
            instance_name=known["instance"],
            contact_phone="+77011239999",
            level=1,
            test_event_code="T\x00",
        ),
    ),
    "IngestMessage.instance_name": lambda known: (
        "/capi.v1.QualificationService/IngestMessage",
        _qpb().IngestMessageRequest(
            instance_name="a\x00", contact_phone="+77011234567", message_id="m", text="t"
        ),
    ),
    "IngestMessage.message_id": lambda known: (
        "/capi.v1.QualificationService/IngestMessage",
        _qpb().IngestMessageRequest(
            direction_id=known["direction"],
            contact_phone="+77011234567",
            message_id="m\x00",
            text="t",
        ),
    ),
    "CreateUserAccount.name": lambda known: (
        "/capi.v1.SettingsService/CreateUserAccount",
        setpb.CreateUserAccountRequest(user_account=res.UserAccount(name="a\x00b")),
    ),
    "CreateDirection.name": lambda known: (
        "/capi.v1.SettingsService/CreateDirection",
        setpb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=known["account"], name="a\x00", pixel_id="1234567890"
            )
        ),
    ),
}


def _raw_call(server: ThreadedServer, path: str, request: Message) -> grpc.StatusCode:
    call: Any = server.channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("case", sorted(NUL_CASES))
def test_nul_in_string_fields_is_not_internal(server: ThreadedServer, case: str) -> None:
    """Proves a NUL character in a string field is answered with a clean error (not
    INTERNAL) on PostgreSQL, and the server keeps serving."""
    if server.backend != "postgresql":
        pytest.skip("SQLite stores NUL; the defect is PostgreSQL's")
    path, request = NUL_CASES[case](server.known)
    assert _raw_call(server, path, request) not in FORBIDDEN
    assert server.serving()


OVERLONG_CASES: dict[str, Callable[[dict[str, str]], tuple[str, Message]]] = {
    "CreateAdAccount.name": lambda known: (
        "/capi.v1.SettingsService/CreateAdAccount",
        setpb.CreateAdAccountRequest(
            ad_account=res.AdAccount(user_account_id=known["account"], name="x" * 201)
        ),
    ),
    "SendConversion.test_event_code": lambda known: (
        "/capi.v1.CapiSenderService/SendConversion",
        _spb().SendConversionRequest(
            instance_name=known["instance"],
            contact_phone="+77011238888",
            level=1,
            test_event_code="T" * 65,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(OVERLONG_CASES))
def test_values_longer_than_their_column_are_invalid_argument(
    server: ThreadedServer, case: str
) -> None:
    """Proves a value longer than its database column is refused with INVALID_ARGUMENT on
    both backends (not INTERNAL on PostgreSQL, not stored on SQLite)."""
    path, request = OVERLONG_CASES[case](server.known)
    assert _raw_call(server, path, request) == grpc.StatusCode.INVALID_ARGUMENT
