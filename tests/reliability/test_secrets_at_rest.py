"""Secrets at rest: tokens are Fernet-encrypted with CAPI_ENCRYPTION_KEYS, keys rotate."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as setpb
from tests.conftest import Stubs, make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph
from tests.fakes.http import FakeResponse
from tests.reliability.support import (
    Direction,
    create_direction,
    dump_tables,
    phone_of,
    send_request,
    sync_engine,
)


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph() as fake:
        yield fake


def secret(kind: str) -> str:
    return f"EAAB-{kind}-{uuid.uuid4().hex}"


def encrypted_settings(database_url: str, graph: FakeGraph, keys: str, **kw: Any) -> Any:
    return make_settings(
        database_url,
        encryption_keys=keys,
        insecure_dev=False,
        meta_graph_url=graph.base_url,
        retry_base_seconds=0.0,
        retry_max_seconds=0.0,
        **kw,
    )


async def create_crm_connections(stubs: Stubs, account_id: str) -> dict[str, str]:
    """One amoCRM and one Bitrix24 connection with tokens; returns the secrets used."""
    secrets = {
        "amo_token": secret("amo"),
        "bitrix_app_token": secret("bxapp"),
        "bitrix_code": uuid.uuid4().hex,
    }
    await stubs.settings.CreateCrmConnection(
        setpb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account_id,
                crm_type=res.CRM_TYPE_AMOCRM,
                base_url=f"https://{uuid.uuid4().hex[:12]}.amocrm.ru",
                access_token=secrets["amo_token"],
            )
        )
    )
    await stubs.settings.CreateCrmConnection(
        setpb.CreateCrmConnectionRequest(
            crm_connection=res.CrmConnection(
                user_account_id=account_id,
                crm_type=res.CRM_TYPE_BITRIX24,
                base_url=f"https://{uuid.uuid4().hex[:12]}.bitrix24.ru/rest/1/"
                f"{secrets['bitrix_code']}/",
                application_token=secrets["bitrix_app_token"],
            )
        )
    )
    return secrets


async def test_tokens_are_not_stored_in_clear_and_sends_use_the_right_one(
    database_url: str, graph: FakeGraph
) -> None:
    """Proves user-account, ad-account and CRM tokens written through the RPCs appear nowhere
    in clear in a dump of every table, and that a send still reaches Graph with the ad
    account's token (decrypted), the user account's token when there is no ad account."""
    key = Fernet.generate_key().decode()
    stubs = await start_stubs(encrypted_settings(database_url, graph, key))
    try:
        user_token, ad_token = secret("user"), secret("ad")
        with_ad = await create_direction(stubs.settings, user_token=user_token, ad_token=ad_token)
        user_only_token = secret("user2")
        user_only = await create_direction(stubs.settings, user_token=user_only_token)
        crm = await create_crm_connections(stubs, with_ad.account_id)
        await stubs.sender.SendConversion(send_request(with_ad, phone_of(1), 1))
        await stubs.sender.SendConversion(send_request(user_only, phone_of(2), 1))
    finally:
        await stop_stubs(stubs)
    assert graph.tokens() == [ad_token, user_only_token]
    with sync_engine(database_url) as engine:
        dump = dump_tables(engine)
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT access_token FROM user_accounts WHERE id = :id"),
                {"id": int(with_ad.account_id)},
            ).scalar_one()
    for value in (user_token, ad_token, user_only_token, crm["amo_token"], crm["bitrix_app_token"]):
        assert value not in dump
    # Stored as a Fernet token under the configured key, not merely encoded.
    assert stored.startswith("fernet:")
    assert Fernet(key.encode()).decrypt(stored.removeprefix("fernet:").encode()).decode() == (
        user_token
    )


async def test_bitrix24_webhook_code_is_not_stored_in_clear(
    database_url: str, graph: FakeGraph
) -> None:
    """Proves the Bitrix24 incoming-webhook code (a credential: anyone holding the URL can
    call the portal's REST API) does not appear in clear in the database."""
    stubs = await start_stubs(
        encrypted_settings(database_url, graph, Fernet.generate_key().decode())
    )
    try:
        direction = await create_direction(stubs.settings)
        crm = await create_crm_connections(stubs, direction.account_id)
    finally:
        await stop_stubs(stubs)
    with sync_engine(database_url) as engine:
        assert crm["bitrix_code"] not in dump_tables(engine)


async def test_key_rotation_keeps_old_tokens_usable(database_url: str, graph: FakeGraph) -> None:
    """Proves a server restarted with "newkey,oldkey" still sends with a token written under
    oldkey, and encrypts new tokens with newkey (the first key)."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = await start_stubs(encrypted_settings(database_url, graph, old))
    try:
        ad_token = secret("ad")
        direction = await create_direction(first.settings, ad_token=ad_token)
    finally:
        await stop_stubs(first)
    second = await start_stubs(encrypted_settings(database_url, graph, f"{new},{old}"))
    try:
        resp = await second.sender.SendConversion(send_request(direction, phone_of(3), 1))
        assert resp.events[0].outcome == res.SEND_OUTCOME_SENT
        fresh_token = secret("user-new")
        fresh = await create_direction(second.settings, user_token=fresh_token)
    finally:
        await stop_stubs(second)
    assert graph.tokens() == [ad_token]
    with sync_engine(database_url) as engine, engine.connect() as conn:
        stored = conn.execute(
            text("SELECT access_token FROM user_accounts WHERE id = :id"),
            {"id": int(fresh.account_id)},
        ).scalar_one()
    assert Fernet(new.encode()).decrypt(stored.removeprefix("fernet:").encode()).decode() == (
        fresh_token
    )


async def test_token_under_a_removed_key_fails_cleanly(database_url: str, graph: FakeGraph) -> None:
    """Proves a send whose token was written under a key no longer configured fails with
    FAILED_PRECONDITION (an operator can act on it), not INTERNAL."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = await start_stubs(encrypted_settings(database_url, graph, old))
    try:
        direction = await create_direction(first.settings, ad_token=secret("ad"))
    finally:
        await stop_stubs(first)
    second = await start_stubs(encrypted_settings(database_url, graph, new))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second.sender.SendConversion(send_request(direction, phone_of(4), 1))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
    finally:
        await stop_stubs(second)


async def test_undecryptable_token_does_not_block_other_directions_queue(
    database_url: str, graph: FakeGraph
) -> None:
    """Proves one direction whose token cannot be decrypted does not stop the retry queue
    from delivering other directions' events."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = await start_stubs(encrypted_settings(database_url, graph, f"{new},{old}"))
    try:
        # `stale` keeps a token only `old` opens; `healthy` gets one under `new`.
        stale: Direction = await _direction_under(database_url, graph, old)
        healthy = await create_direction(first.settings, ad_token=secret("ad-healthy"))
        graph.set_handler(lambda request: FakeResponse(503, {"error": {"code": 2}}))
        for direction, index in ((stale, 5), (healthy, 6)):
            resp = await first.sender.SendConversion(send_request(direction, phone_of(index), 1))
            assert resp.events[0].outcome == res.SEND_OUTCOME_QUEUED
        graph.set_handler(None)
        graph.clear()
    finally:
        await stop_stubs(first)
    second = await start_stubs(encrypted_settings(database_url, graph, new))
    try:
        await second.app.sender.process_due()
    finally:
        await stop_stubs(second)
    assert len(graph.posts()) == 1


async def _direction_under(database_url: str, graph: FakeGraph, key: str) -> Direction:
    stubs = await start_stubs(encrypted_settings(database_url, graph, key))
    try:
        return await create_direction(stubs.settings, ad_token=secret("ad-stale"))
    finally:
        await stop_stubs(stubs)


async def test_the_server_refuses_keys_that_are_not_fernet_keys(database_url: str) -> None:
    """Proves a malformed CAPI_ENCRYPTION_KEYS stops the start-up with a message naming the
    variable, instead of starting with tokens stored in clear."""
    from capi_server.bootstrap import StartupError, build_app

    with pytest.raises(StartupError, match="CAPI_ENCRYPTION_KEYS"):
        await build_app(
            make_settings(database_url, encryption_keys="not-a-key", insecure_dev=False),
            run_migrations=False,
        )
