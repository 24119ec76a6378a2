"""The `capi` command through its installed entry point, against the real server."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from capi.v1 import resources_pb2 as res
from capi_client import AsyncCapiClient
from tests.conftest import REPO_ROOT, Stubs, make_settings, start_stubs, stop_stubs

CAPI = REPO_ROOT / ".venv" / "bin" / "capi"


@dataclass
class Run:
    code: int
    out: str
    err: str


async def capi(*args: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        str(CAPI),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def server(sqlite_url: str) -> AsyncIterator[Stubs]:
    # The CLI is a client concern: one backend is enough here.
    stubs = await start_stubs(make_settings(sqlite_url, auth_tokens="ops:tok123"))
    try:
        yield stubs
    finally:
        await stop_stubs(stubs)


async def make_direction(stubs: Stubs) -> str:
    async with AsyncCapiClient(stubs.target, token="tok123") as client:
        account = (await client.create_user_account("Acme")).user_account.id
        direction = res.Direction(user_account_id=account, name="Dental clinic", pixel_id="123456")
        direction.capi.test_event_code = "TEST1"
        return (await client.create_direction(direction)).direction.id


def normalise(table: str) -> str:
    """Ids differ per run (the database is shared within a session)."""
    table = re.sub(r"(?m)^(id|user_account_id)( +)\d+$", r"\1\2<n>", table)
    return re.sub(
        r"(?m)^(create_time|update_time)( +)\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$", r"\1\2<t>", table
    )


GOLDEN_TABLE = """\
FIELD                             VALUE
id                                <n>
user_account_id                   <n>
ad_account_id                     -
name                              Dental clinic
instance_name                     -
pixel_id                          123456
whatsapp_business_account_id      -
qualification_prompt              -
capi.enabled                      false
capi.source                       -
capi.crm_type                     -
capi.crm_connection_id            -
capi.interest_fields              -
capi.qualified_fields             -
capi.scheduled_fields             -
capi.test_event_code              TEST1
capi.event_names.interest         Lead
capi.event_names.qualified        CompleteRegistration
capi.event_names.scheduled        Schedule
capi.require_ctwa_clid            false
capi.limited_data_use             false
capi.review_confidence_threshold  0.0
create_time                       <t>
update_time                       <t>
"""


async def test_direction_show_table_and_json(server: Stubs) -> None:
    direction_id = await make_direction(server)
    base = ("--target", server.target, "--token", "tok123")
    table = await capi(*base, "direction", "show", direction_id)
    assert (table.code, table.err) == (0, "")
    assert normalise(table.out) == GOLDEN_TABLE
    as_json = await capi(*base, "--json", "direction", "show", direction_id)
    assert as_json.code == 0
    document = json.loads(as_json.out)
    assert document.pop("user_account_id").isdigit()
    assert document.pop("create_time") and document.pop("update_time")
    assert document == {
        "id": direction_id,
        "name": "Dental clinic",
        "pixel_id": "123456",
        "capi": {
            "test_event_code": "TEST1",
            "event_names": {
                "interest": "Lead",
                "qualified": "CompleteRegistration",
                "scheduled": "Schedule",
            },
        },
    }


async def test_direction_set_builds_the_update_mask(server: Stubs) -> None:
    direction_id = await make_direction(server)
    base = ("--target", server.target, "--token", "tok123", "--json")
    run = await capi(
        *base,
        "direction",
        "set",
        direction_id,
        "pixel_id=777",
        "capi.enabled=true",
        "capi.source=whatsapp",
        "capi.test_event_code=",
    )
    assert (run.code, run.err) == (0, "")
    document = json.loads(run.out)
    assert document["pixel_id"] == "777"
    assert document["capi"]["enabled"] is True
    assert document["capi"]["source"] == "CAPI_SOURCE_WHATSAPP"
    assert "test_event_code" not in document["capi"]  # cleared
    assert document["name"] == "Dental clinic"  # not in the mask: unchanged


async def test_exit_codes(server: Stubs) -> None:
    base = ("--target", server.target)
    missing = await capi(*base, "--token", "tok123", "direction", "show", "999999999")
    assert missing.code == 1
    assert missing.err == (
        "capi: error NOT_FOUND (DIRECTION_NOT_FOUND): direction 999999999 not found\n"
    )
    bad_token = await capi(*base, "--token", "nope", "direction", "show", "1")
    assert bad_token.code == 4
    assert bad_token.err.startswith("capi: error UNAUTHENTICATED (UNAUTHENTICATED): ")
    usage = await capi(*base, "--token", "tok123", "direction", "set", "1", "bogus=1")
    assert (usage.code, usage.err) == (2, "capi: unknown field 'bogus'\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_connection_is_one_line_and_exit_3() -> None:
    run = await capi("--target", f"127.0.0.1:{free_port()}", "direction", "show", "1")
    assert run.code == 3
    assert run.err.count("\n") == 1
    assert run.err.startswith("capi: cannot connect to 127.0.0.1:")
    assert "Traceback" not in run.err
    assert run.out == ""
