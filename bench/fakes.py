"""Fake Meta Graph and OpenAI servers for the benchmark, in their own process.

tests/fakes/http.py's FakeHttpServer is a thread per connection and records every request:
right for tests, but at thousands of requests per second it would measure itself. This is
a small asyncio HTTP/1.1 server (keep-alive, Content-Length or chunked bodies) that only
counts. One port serves:

- `POST /{version}/{pixel}/events` (Graph): `{"events_received": n, "fbtrace_id": ...}`;
- `GET /{version}/{pixel}` (Graph token probe): `{"id": pixel}`;
- `POST /v1/chat/completions` (OpenAI): a verdict "interested" after `llm_delay` seconds;
- `GET /_stats`: the counters as JSON; `POST /_config`: `{"llm_delay": seconds}`;
- `POST /_amo_leads`: `{"base": first_id, "count": n, "phone_prefix": "+55 11 9"}` adds
  leads with their own contacts to the fake amoCRM (tests/fakes/crm.py, threaded: CRM
  calls are bounded by the CRM's rate limit, so its speed matters little).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tests.fakes.crm import FakeAmoCrm
from tests.fakes.openai_server import verdict_json

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


@dataclass
class Counters:
    graph_posts: int = 0
    graph_events: int = 0
    graph_last_event_at: float = 0.0
    llm_requests: int = 0
    llm_delay: float = 0.0


class BenchFakes:
    """The routes above; `amo` is the threaded fake amoCRM started beside it."""

    def __init__(self, amo: FakeAmoCrm) -> None:
        self.counters = Counters()
        self.amo = amo
        self._completion_content = json.dumps(
            verdict_json(interested=True, qualified=False, scheduled=False)
        )

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        if method == "POST" and len(parts) == 3 and parts[2] == "events":
            return self._graph_events(body)
        if method == "GET" and len(parts) == 2 and parts[0].startswith("v"):
            return 200, json.dumps({"id": parts[1]}).encode()
        if method == "POST" and parts[-2:] == ["chat", "completions"]:
            return await self._chat(body)
        if parts == ["_stats"]:
            return 200, json.dumps(self.stats()).encode()
        if method == "POST" and parts == ["_config"]:
            self.counters.llm_delay = float(json.loads(body).get("llm_delay", 0.0))
            return 200, b"{}"
        if method == "POST" and parts == ["_amo_leads"]:
            spec = json.loads(body)
            base = int(spec["base"])
            self.amo.add_leads(base, base + 50_000_000, int(spec["count"]), spec["phone_prefix"])
            return 200, b"{}"
        return 404, b'{"error": {"message": "unknown route", "code": 100}}'

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "graph_posts": c.graph_posts,
            "graph_events": c.graph_events,
            "graph_last_event_at": c.graph_last_event_at,
            "llm_requests": c.llm_requests,
            "llm_delay": c.llm_delay,
            "amo_requests": len(self.amo.server.requests),
            "amo_url": self.amo.base_url,
            "amo_token": self.amo.token,
        }

    def _graph_events(self, body: bytes) -> tuple[int, bytes]:
        try:
            data = json.loads(body).get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list) or not data:
            return 400, b'{"error": {"message": "(#100) data is required", "code": 100}}'
        c = self.counters
        c.graph_posts += 1
        c.graph_events += len(data)
        c.graph_last_event_at = time.time()
        answer = {"events_received": len(data), "messages": [], "fbtrace_id": "BenchTrace"}
        return 200, json.dumps(answer).encode()

    async def _chat(self, body: bytes) -> tuple[int, bytes]:
        self.counters.llm_requests += 1
        if self.counters.llm_delay:
            await asyncio.sleep(self.counters.llm_delay)
        model = str(json.loads(body).get("model", "gpt-4o-mini"))
        completion = {
            "id": f"chatcmpl-bench{self.counters.llm_requests}",
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": self._completion_content,
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        }
        return 200, json.dumps(completion).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await _read_body(reader, headers)
                status, payload = await self.route(method, target, body)
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n"
                    % (status, _REASONS.get(status, "Error").encode(), len(payload))
                    + payload
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length") or 0)
    return await reader.readexactly(length) if length else b""


async def _serve(ready: Connection) -> None:
    amo = FakeAmoCrm()
    amo.start()
    fakes = BenchFakes(amo)
    server = await asyncio.start_server(fakes.handle, "127.0.0.1", 0, limit=1 << 20)
    port = int(server.sockets[0].getsockname()[1])
    ready.send(port)
    async with server:
        await server.serve_forever()


def serve_fakes(ready: Connection) -> None:
    """Process entry: serves until the process is terminated; sends its port on `ready`."""
    asyncio.run(_serve(ready))
