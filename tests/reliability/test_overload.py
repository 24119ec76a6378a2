"""Overload: a burst far above CAPI_MAX_CONCURRENT_RPCS is shed, memory stays bounded."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest

from capi.v1 import resources_pb2 as res
from tests.fakes.graph import FakeGraph
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Client,
    ServerProcess,
    create_direction,
    fresh_pg_database,
    phone_of,
    send_request,
    server_env,
)

RSS_LIMIT_MB = 250.0


async def burst_waves(
    tmp_path: Path, figures: Figures, *, waves: int, burst: int
) -> tuple[Counter[str], list[float]]:
    codes: Counter[str] = Counter()
    rss: list[float] = []
    with fresh_pg_database() as url, FakeGraph() as graph:
        graph.set_delay(0.5)
        server = ServerProcess(
            server_env(url, graph.base_url, CAPI_MAX_CONCURRENT_RPCS="8"),
            tmp_path / "server.log",
        ).start()
        try:
            await server.wait_serving()
            client = Client.insecure(server.target)
            direction = await create_direction(client.settings)
            rss.append(server.rss_mb())
            sampling = True

            async def sample() -> None:
                while sampling:
                    rss.append(server.rss_mb())
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            for wave in range(waves):
                results = await asyncio.gather(
                    *(
                        client.sender.SendConversion(
                            send_request(direction, phone_of(wave * burst + i, "7704"), 1),
                            timeout=60,
                        )
                        for i in range(burst)
                    ),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, grpc.aio.AioRpcError):
                        codes[result.code().name] += 1
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        codes["OK"] += 1
                assert server.alive()
            sampling = False
            await sampler
            # Serves normally afterwards.
            graph.set_delay(0.0)
            after = await client.sender.SendConversion(
                send_request(direction, phone_of(9_999_999, "7704"), 1), timeout=10
            )
            assert after.events[0].outcome == res.SEND_OUTCOME_SENT
            await client.close()
            assert server.alive()
        finally:
            server.stop()
    figures.record(
        burst=burst,
        waves=waves,
        max_concurrent_rpcs=8,
        outcomes=dict(codes),
        rss_start_mb=round(rss[0], 1),
        rss_max_mb=round(max(rss), 1),
        rss_end_mb=round(rss[-1], 1),
    )
    return codes, rss


async def test_burst_is_shed_with_resource_exhausted_and_memory_stays_bounded(
    tmp_path: Path, figures: Figures
) -> None:
    """Proves that 500 concurrent SendConversion calls against a real server limited to 8
    in-flight RPCs, with Graph answering in 0.5 s, get OK or RESOURCE_EXHAUSTED only (some of
    each), the process survives with RSS below 250 MB, and serves normally afterwards."""
    codes, rss = await burst_waves(tmp_path, figures, waves=1, burst=500)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= 8 and codes["RESOURCE_EXHAUSTED"] > 0, codes
    assert max(rss) < RSS_LIMIT_MB


@pytest.mark.soak
async def test_soak_repeated_bursts_do_not_grow_memory(tmp_path: Path, figures: Figures) -> None:
    """Proves 10 bursts of 1,000 calls are shed the same way and RSS does not keep growing
    (no leak per refused or served call): the peak stays below 250 MB."""
    codes, rss = await burst_waves(tmp_path, figures, waves=10, burst=1000)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert max(rss) < RSS_LIMIT_MB
