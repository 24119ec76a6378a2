"""How agent-service forwards webhooks to capi unchanged (examples; nothing runs on import).

agent-service receives the Evolution API and CRM webhooks; it passes the bodies on as
they are, so capi (not agent-service) knows every payload format:

    from capi_client import AsyncCapiClient, BackgroundAnalyzer

    capi = AsyncCapiClient("capi:50051", token=os.environ["CAPI_TOKEN"])
    analyzer = BackgroundAnalyzer(capi)

    # in the Evolution webhook handler (after the bot has answered):
    await forward_evolution_webhook(capi, analyzer, await request.body())

    # in the amoCRM / Bitrix24 webhook handler:
    await forward_crm_webhook(capi, await request.body(), request.headers["content-type"])

    # on shutdown:
    await analyzer.close(drain_timeout=5)
    await capi.close()
"""

from __future__ import annotations

import logging

from capi_client._async_client import AsyncCapiClient
from capi_client._background import BackgroundAnalyzer
from capi_client._errors import CapiError

log = logging.getLogger("agent_service.capi")


async def forward_evolution_webhook(
    client: AsyncCapiClient, analyzer: BackgroundAnalyzer, raw_body: bytes
) -> None:
    """Stores the message (cheap, idempotent by message id), then queues an analysis."""
    try:
        stored = await client.ingest_evolution_webhook(raw_body, timeout=2.0)
    except CapiError as exc:
        # Never fail the webhook for capi: the chatbot must keep answering.
        log.warning("capi ingest failed: %s", exc.code.name)
        return
    if stored.stored and stored.dialog_id:
        analyzer.submit(dialog_id=stored.dialog_id)


async def forward_crm_webhook(client: AsyncCapiClient, body: bytes, content_type: str) -> int:
    """Passes a CRM webhook on as received; returns the HTTP status to answer the CRM."""
    try:
        await client.handle_crm_webhook(body, content_type, timeout=5.0)
    except CapiError as exc:
        log.warning("capi crm webhook failed: %s %s", exc.code.name, exc.reason)
        # 5xx makes amoCRM / Bitrix24 redeliver, which is safe (sends are idempotent);
        # a rejected payload will never succeed, so it is acknowledged.
        return 400 if exc.code.name == "INVALID_ARGUMENT" else 503
    return 200
