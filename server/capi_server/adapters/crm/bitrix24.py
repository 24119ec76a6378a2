"""Bitrix24 REST client over a portal's incoming webhook URL.

The base URL is `https://{portal}/rest/{user_id}/{code}/`; the code is a secret, so the URL
never appears in messages. Shapes: shared/design/research/payloads.md section 3.

Bitrix24 list ("enumeration") fields hold item IDs; the client resolves them through
crm.<entity>.fields (cached for `fields_cache_seconds`), so a `CrmFieldValue` of a list
field has the IDs in `enum_ids` and the item texts in `values`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx2

from capi_server.adapters.crm.base import (
    DEFAULT_TIMEOUT_SECONDS,
    AsyncRateLimiter,
    CrmError,
    CrmErrorKind,
    RetryPolicy,
    call_with_retries,
    excerpt,
    parse_retry_after,
)
from capi_server.domain.crm import (
    CrmEntity,
    CrmFieldInfo,
    CrmFieldValue,
    CrmType,
    EntityType,
    normalise_field_id,
    normalise_id,
)

# Non-enterprise portals drain 2 requests/s from a bucket of 50; stay well inside it.
BITRIX24_RATE_PER_SECOND = 2.0
BITRIX24_BURST = 10
_LIST_PAGE = 50  # Bitrix24 list methods always return pages of 50
_MAX_PAGES = 100

_RATE_LIMIT_ERRORS = frozenset({"QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT", "OPERATION_TIME_LIMIT"})
_AUTH_ERRORS = frozenset(
    {
        "EXPIRED_TOKEN",
        "INVALID_TOKEN",
        "NO_AUTH_FOUND",
        "INVALID_CREDENTIALS",
        "INSUFFICIENT_SCOPE",
        "ACCESS_DENIED",
        "PORTAL_DELETED",
        "WRONG_AUTH_TYPE",
        "INVALID_GRANT",
        "AUTHORIZATION_ERROR",
    }
)
_MULTIFIELDS = frozenset({"PHONE", "EMAIL", "WEB", "IM", "LINK"})
_ENUM_TYPES = frozenset({"enumeration", "crm_status", "crm_category"})

_Json = dict[str, Any]


def _as_dict(value: object) -> _Json:
    return value if isinstance(value, dict) else {}


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _scalar_text(raw: object) -> str | None:
    if raw is None or isinstance(raw, dict | list):
        return None
    if isinstance(raw, bool):
        return "Y" if raw else "N"
    text = str(raw)
    return text if text.strip() else None


def _iso_to_unix(raw: object) -> int | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return int(datetime.fromisoformat(raw).timestamp())
    except ValueError:
        return None


def _multifield_values(document: _Json, key: str) -> list[str]:
    """VALUEs of a PHONE/EMAIL multifield: [{ID, VALUE_TYPE, VALUE, TYPE_ID}]."""
    found: list[str] = []
    for item in _as_list(document.get(key)):
        text = _scalar_text(_as_dict(item).get("VALUE"))
        if text:
            found.append(text.strip())
    return found


def _field_values(document: _Json, metadata: Mapping[str, _Json]) -> dict[str, CrmFieldValue]:
    """Every scalar or list-of-scalars field of an entity; empty values are left out."""
    fields: dict[str, CrmFieldValue] = {}
    for key, raw in document.items():
        if key.upper() in _MULTIFIELDS:
            continue
        raw_items = raw if isinstance(raw, list) else [raw]
        texts = [t for t in (_scalar_text(item) for item in raw_items) if t is not None]
        if not texts:
            continue
        field_id = normalise_field_id(key)
        meta = metadata.get(key) or metadata.get(field_id) or {}
        field_type = str(meta.get("type") or "")
        if field_type in _ENUM_TYPES:
            labels = {
                normalise_id(_as_dict(i).get("ID")): str(_as_dict(i).get("VALUE") or "")
                for i in _as_list(meta.get("items"))
                if _as_dict(i).get("ID") is not None
            }
            enum_ids = tuple(normalise_id(t) for t in texts)
            values = tuple(
                labels.get(enum_id, text) for enum_id, text in zip(enum_ids, texts, strict=True)
            )
            fields[field_id] = CrmFieldValue(field_id, values, enum_ids)
        else:
            fields[field_id] = CrmFieldValue(field_id, tuple(texts))
    return fields


def _dedupe(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


class Bitrix24Client:
    """A `CrmClient` for one Bitrix24 portal. Create once, `aclose()` at shutdown."""

    def __init__(
        self,
        *,
        webhook_url: str,
        rate_limiter: AsyncRateLimiter | None = None,
        rate_per_second: float = BITRIX24_RATE_PER_SECOND,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        fields_cache_seconds: float = 300.0,
        transport: httpx2.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = rate_limiter or AsyncRateLimiter(rate_per_second, BITRIX24_BURST)
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._fields_ttl = fields_cache_seconds
        self._fields_cache: dict[EntityType, tuple[float, dict[str, _Json]]] = {}
        self._http = httpx2.AsyncClient(
            base_url=webhook_url.strip().rstrip("/") + "/",
            headers={"Accept": "application/json"},
            timeout=httpx2.Timeout(timeout_seconds, connect=min(timeout_seconds, 5.0)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- CrmClient ------------------------------------------------------------------------

    async def get_entity(self, entity_type: EntityType, entity_id: str) -> CrmEntity:
        entity_id = normalise_id(entity_id)
        document = await self._get_raw(entity_type, entity_id)
        entity = CrmEntity(
            crm_type=CrmType.BITRIX24,
            entity_type=entity_type,
            entity_id=normalise_id(document.get("ID") or entity_id),
            fields=_field_values(document, await self._field_metadata(entity_type)),
            contact_phones=tuple(_multifield_values(document, "PHONE")),
            contact_emails=tuple(_multifield_values(document, "EMAIL")),
            updated_at=_iso_to_unix(document.get("DATE_MODIFY")),
        )
        if entity_type is EntityType.CONTACT:
            return entity
        contact_ids = [
            normalise_id(c)
            for c in [document.get("CONTACT_ID"), *_as_list(document.get("CONTACT_IDS"))]
            if _scalar_text(c) not in (None, "0")
        ]
        contact_ids = list(dict.fromkeys(contact_ids))
        main_contact: CrmEntity | None = None
        if contact_ids:
            try:
                main_contact = await self.get_entity(EntityType.CONTACT, contact_ids[0])
            except CrmError as exc:
                # A deleted contact leaves the deal readable, just without phones.
                if exc.kind != "not_found":
                    raise
        if main_contact is None:
            return CrmEntity(
                crm_type=entity.crm_type,
                entity_type=entity.entity_type,
                entity_id=entity.entity_id,
                fields=entity.fields,
                contact_phones=entity.contact_phones,
                contact_emails=entity.contact_emails,
                linked_contact_ids=tuple(contact_ids),
                updated_at=entity.updated_at,
            )
        return CrmEntity(
            crm_type=entity.crm_type,
            entity_type=entity.entity_type,
            entity_id=entity.entity_id,
            fields=entity.fields,
            contact_phones=_dedupe([*entity.contact_phones, *main_contact.contact_phones]),
            contact_emails=_dedupe([*entity.contact_emails, *main_contact.contact_emails]),
            linked_contact_ids=tuple(contact_ids),
            updated_at=entity.updated_at,
            main_contact=main_contact,
        )

    async def list_fields(self, entity_type: EntityType) -> list[CrmFieldInfo]:
        metadata = await self._field_metadata(entity_type, refresh=True)
        fields: list[CrmFieldInfo] = []
        for key, meta in metadata.items():
            name = meta.get("listLabel") or meta.get("formLabel") or meta.get("title") or key
            enums = tuple(
                (normalise_id(item["ID"]), str(item.get("VALUE") or ""))
                for item in (_as_dict(i) for i in _as_list(meta.get("items")))
                if item.get("ID") is not None
            )
            fields.append(
                CrmFieldInfo(
                    field_id=normalise_field_id(key),
                    field_name=str(name),
                    field_type=str(meta.get("type") or ""),
                    enums=enums,
                )
            )
        return fields

    async def list_changed_since(
        self, entity_type: EntityType, since_unix: int, limit: int
    ) -> list[str]:
        since = datetime.fromtimestamp(since_unix, UTC).isoformat()
        ids: list[str] = []
        start = 0
        for _ in range(_MAX_PAGES):
            if len(ids) >= limit:
                break
            document = await self._call(
                f"crm.{entity_type.value}.list",
                {
                    "filter[>DATE_MODIFY]": since,
                    "order[DATE_MODIFY]": "ASC",
                    "select[]": "ID",
                    "start": str(start),
                },
            )
            rows = _as_list(document.get("result"))
            ids.extend(normalise_id(_as_dict(r)["ID"]) for r in rows if _as_dict(r).get("ID"))
            next_start = document.get("next")
            if not rows or not isinstance(next_start, int) or next_start <= start:
                break
            start = next_start
        return ids[:limit]

    # -- internals ------------------------------------------------------------------------

    async def _get_raw(self, entity_type: EntityType, entity_id: str) -> _Json:
        document = await self._call(f"crm.{entity_type.value}.get", {"id": entity_id})
        result = document.get("result")
        if not isinstance(result, dict):
            raise CrmError(
                "Bitrix24 entity response has no object result",
                "bad_response",
                200,
                excerpt(str(result)),
            )
        return result

    async def _field_metadata(
        self, entity_type: EntityType, *, refresh: bool = False
    ) -> dict[str, _Json]:
        cached = self._fields_cache.get(entity_type)
        now = self._clock()
        if cached is not None and not refresh and cached[0] > now:
            return cached[1]
        document = await self._call(f"crm.{entity_type.value}.fields", {})
        result = document.get("result")
        if not isinstance(result, dict):
            raise CrmError("Bitrix24 fields response has no object result", "bad_response", 200)
        metadata = {str(key): _as_dict(meta) for key, meta in result.items()}
        self._fields_cache[entity_type] = (now + self._fields_ttl, metadata)
        return metadata

    async def _call(self, method: str, params: Mapping[str, str]) -> _Json:
        async def attempt() -> _Json:
            await self._limiter.acquire()
            try:
                response = await self._http.get(f"{method}.json", params=params)
            except httpx2.TimeoutException as exc:
                raise CrmError("Bitrix24 request timed out", "unavailable") from exc
            except httpx2.HTTPError as exc:
                raise CrmError(
                    f"Bitrix24 unreachable: {type(exc).__name__}", "unavailable"
                ) from exc
            return _interpret(response)

        return await call_with_retries(attempt, self._retry, sleep=self._sleep)


def _interpret(response: httpx2.Response) -> _Json:
    """The JSON envelope of a success; CrmError for error bodies, statuses and garbage."""
    status = response.status_code
    body = response.content
    try:
        document: object = response.json() if body else None
    except ValueError:
        document = None
    if isinstance(document, dict) and "error" in document:
        raise _error_from_body(document, response)
    if status in (401, 403):
        raise CrmError("Bitrix24 credentials rejected", "auth", status, excerpt(body))
    if status == 429 or status >= 500:
        kind: CrmErrorKind = "rate_limited" if status == 429 else "unavailable"
        raise CrmError(
            f"Bitrix24 answered HTTP {status}",
            kind,
            status,
            excerpt(body),
            retry_after_seconds=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status != 200:
        raise CrmError(f"Bitrix24 answered HTTP {status}", "bad_response", status, excerpt(body))
    if not isinstance(document, dict) or "result" not in document:
        raise CrmError(
            "Bitrix24 sent a body that is not a JSON result", "bad_response", status, excerpt(body)
        )
    return document


def _error_from_body(document: _Json, response: httpx2.Response) -> CrmError:
    """Map Bitrix24's {"error", "error_description"} to a CrmError kind."""
    status = response.status_code
    code = str(document.get("error") or "").strip()
    description = str(document.get("error_description") or "").strip().lower()
    body = excerpt(response.content)
    upper = code.upper()
    if upper in _RATE_LIMIT_ERRORS:
        return CrmError(
            f"Bitrix24 rate limit exceeded ({upper})",
            "rate_limited",
            status,
            body,
            retry_after_seconds=parse_retry_after(response.headers.get("Retry-After")),
        )
    if upper in _AUTH_ERRORS or status == 401:
        return CrmError("Bitrix24 credentials rejected", "auth", status, body)
    if "not found" in description or "id is not defined" in description or upper == "NOT_FOUND":
        return CrmError("Bitrix24 entity not found", "not_found", status, body)
    if "access denied" in description:
        return CrmError("Bitrix24 denied access to the entity", "auth", status, body)
    if status >= 500 or upper == "INTERNAL_SERVER_ERROR":
        return CrmError(f"Bitrix24 server error ({upper or status})", "unavailable", status, body)
    return CrmError(f"Bitrix24 error {upper or status}", "bad_response", status, body)
