"""amoCRM (Kommo) REST v4 client with a long-lived bearer token.

Shapes: shared/design/research/payloads.md section 2. amoCRM leads are reported as
`EntityType.DEAL` (see capi_server.domain.crm); `EntityType.LEAD` is accepted as a synonym.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx2

from capi_server.adapters.crm.base import (
    DEFAULT_TIMEOUT_SECONDS,
    AsyncRateLimiter,
    CrmError,
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

# amoCRM allows 7 requests per second per account.
AMOCRM_RATE_PER_SECOND = 7.0
_PAGE_LIMIT = 250  # the largest page the API serves
_MAX_PAGES = 100  # a guard against a server that keeps sending `next`

_Json = dict[str, Any]


def amocrm_base_url(subdomain: str, domain: str = "amocrm.ru") -> str:
    """`https://{subdomain}.amocrm.ru` (or .amocrm.com / .kommo.com via `domain`)."""
    return f"https://{subdomain.strip().lower()}.{domain}"


def _collection(entity_type: EntityType) -> str:
    return "contacts" if entity_type is EntityType.CONTACT else "leads"


def _as_dict(value: object) -> _Json:
    return value if isinstance(value, dict) else {}


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _value_text(raw: object) -> str | None:
    """A custom field value as a string: checkbox true -> "true", date ints as digits."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, dict | list):
        return None
    return str(raw)


def parse_custom_fields(custom_fields_values: object) -> dict[str, CrmFieldValue]:
    """`custom_fields_values` (a list, or null when the entity has none) by field id."""
    fields: dict[str, CrmFieldValue] = {}
    for item in _as_list(custom_fields_values):
        entry = _as_dict(item)
        if entry.get("field_id") is None:
            continue
        field_id = normalise_field_id(entry["field_id"])
        values: list[str] = []
        enum_ids: list[str] = []
        for raw_value in _as_list(entry.get("values")):
            value = _as_dict(raw_value)
            text = _value_text(value.get("value"))
            if text is not None:
                values.append(text)
            if value.get("enum_id") is not None:
                enum_ids.append(normalise_id(value["enum_id"]))
        fields[field_id] = CrmFieldValue(field_id, tuple(values), tuple(enum_ids))
    return fields


def _contact_values(custom_fields_values: object, field_code: str) -> list[str]:
    """All values of the contact's system multitext field (PHONE or EMAIL)."""
    found: list[str] = []
    for item in _as_list(custom_fields_values):
        entry = _as_dict(item)
        if str(entry.get("field_code") or "").upper() != field_code:
            continue
        for raw_value in _as_list(entry.get("values")):
            text = _value_text(_as_dict(raw_value).get("value"))
            if text and text.strip():
                found.append(text.strip())
    return found


def _updated_at(document: _Json) -> int | None:
    value = document.get("updated_at")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AmoCrmClient:
    """A `CrmClient` for one amoCRM account. Create once, `aclose()` at shutdown."""

    def __init__(
        self,
        *,
        base_url: str,
        access_token: str,
        rate_limiter: AsyncRateLimiter | None = None,
        rate_per_second: float = AMOCRM_RATE_PER_SECOND,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx2.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._limiter = rate_limiter or AsyncRateLimiter(rate_per_second)
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            timeout=httpx2.Timeout(timeout_seconds, connect=min(timeout_seconds, 5.0)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- CrmClient ------------------------------------------------------------------------

    async def get_entity(self, entity_type: EntityType, entity_id: str) -> CrmEntity:
        entity_id = normalise_id(entity_id)
        if entity_type is EntityType.CONTACT:
            return await self._get_contact(entity_id)
        lead = await self._get_object(f"/api/v4/leads/{entity_id}", {"with": "contacts"})
        contacts = [_as_dict(c) for c in _as_list(_as_dict(lead.get("_embedded")).get("contacts"))]
        contact_ids = [normalise_id(c["id"]) for c in contacts if c.get("id") is not None]
        main_ids = [normalise_id(c["id"]) for c in contacts if c.get("is_main") and c.get("id")]
        candidates = main_ids or contact_ids
        main_id = candidates[0] if candidates else None
        main_contact: CrmEntity | None = None
        if main_id is not None:
            try:
                main_contact = await self._get_contact(main_id)
            except CrmError as exc:
                # A deleted contact leaves the lead readable, just without phones.
                if exc.kind != "not_found":
                    raise
        return CrmEntity(
            crm_type=CrmType.AMOCRM,
            entity_type=EntityType.DEAL,
            entity_id=normalise_id(lead.get("id", entity_id)),
            fields=parse_custom_fields(lead.get("custom_fields_values")),
            contact_phones=main_contact.contact_phones if main_contact else (),
            contact_emails=main_contact.contact_emails if main_contact else (),
            linked_contact_ids=tuple(contact_ids),
            updated_at=_updated_at(lead),
            main_contact=main_contact,
        )

    async def list_fields(self, entity_type: EntityType) -> list[CrmFieldInfo]:
        path = f"/api/v4/{_collection(entity_type)}/custom_fields"
        fields: list[CrmFieldInfo] = []
        for page in range(1, _MAX_PAGES + 1):
            document = await self._get_json(path, {"page": str(page), "limit": str(_PAGE_LIMIT)})
            if document is None:  # 204: no fields at all
                break
            for raw in _as_list(_as_dict(document.get("_embedded")).get("custom_fields")):
                entry = _as_dict(raw)
                if entry.get("id") is None:
                    continue
                enums = tuple(
                    (normalise_id(e["id"]), str(e.get("value") or ""))
                    for e in (_as_dict(x) for x in _as_list(entry.get("enums")))
                    if e.get("id") is not None
                )
                fields.append(
                    CrmFieldInfo(
                        field_id=normalise_field_id(entry["id"]),
                        field_name=str(entry.get("name") or ""),
                        field_type=str(entry.get("type") or ""),
                        enums=enums,
                    )
                )
            if not _has_next_page(document, page):
                break
        return fields

    async def list_changed_since(
        self, entity_type: EntityType, since_unix: int, limit: int
    ) -> list[str]:
        path = f"/api/v4/{_collection(entity_type)}"
        ids: list[str] = []
        page = 1
        while len(ids) < limit and page <= _MAX_PAGES:
            params = {
                "filter[updated_at][from]": str(since_unix),
                "order[updated_at]": "asc",
                "limit": str(min(_PAGE_LIMIT, limit)),
                "page": str(page),
            }
            document = await self._get_json(path, params)
            if document is None:  # 204: nothing changed
                break
            items = _as_list(_as_dict(document.get("_embedded")).get(_collection(entity_type)))
            ids.extend(normalise_id(_as_dict(i)["id"]) for i in items if _as_dict(i).get("id"))
            if not items or not _has_next_page(document, page):
                break
            page += 1
        return ids[:limit]

    # -- internals ------------------------------------------------------------------------

    async def _get_contact(self, contact_id: str) -> CrmEntity:
        contact = await self._get_object(f"/api/v4/contacts/{contact_id}", None)
        custom = contact.get("custom_fields_values")
        return CrmEntity(
            crm_type=CrmType.AMOCRM,
            entity_type=EntityType.CONTACT,
            entity_id=normalise_id(contact.get("id", contact_id)),
            fields=parse_custom_fields(custom),
            contact_phones=tuple(_contact_values(custom, "PHONE")),
            contact_emails=tuple(_contact_values(custom, "EMAIL")),
            updated_at=_updated_at(contact),
        )

    async def _get_object(self, path: str, params: Mapping[str, str] | None) -> _Json:
        document = await self._get_json(path, params)
        if document is None:
            # amoCRM answers 204 for a deleted or unknown entity.
            raise CrmError("amoCRM entity not found", "not_found", 204)
        return document

    async def _get_json(self, path: str, params: Mapping[str, str] | None) -> _Json | None:
        async def attempt() -> _Json | None:
            await self._limiter.acquire()
            try:
                response = await self._http.get(path, params=params)
            except httpx2.TimeoutException as exc:
                raise CrmError("amoCRM request timed out", "unavailable") from exc
            except httpx2.HTTPError as exc:
                raise CrmError(f"amoCRM unreachable: {type(exc).__name__}", "unavailable") from exc
            return _interpret(response)

        return await call_with_retries(attempt, self._retry, sleep=self._sleep)


def _has_next_page(document: _Json, page: int) -> bool:
    if _as_dict(_as_dict(document.get("_links")).get("next")).get("href"):
        return True
    page_count = document.get("_page_count")
    return isinstance(page_count, int) and page < page_count


def _interpret(response: httpx2.Response) -> _Json | None:
    """The JSON object of a success, None for 204, CrmError for everything else."""
    status = response.status_code
    body = response.content
    if status == 204:
        return None
    if status == 401:
        raise CrmError("amoCRM token rejected", "auth", status, excerpt(body))
    if status == 402:
        raise CrmError("amoCRM account subscription has ended", "auth", status, excerpt(body))
    if status == 403:
        raise CrmError(
            "amoCRM denied access (rights, IP whitelist or a block after too many requests)",
            "auth",
            status,
            excerpt(body),
        )
    if status == 404:
        raise CrmError("amoCRM entity not found", "not_found", status, excerpt(body))
    if status == 429:
        hint = parse_retry_after(response.headers.get("Retry-After"))
        if hint is None:
            hint = _retry_after_from_body(response)
        raise CrmError(
            "amoCRM rate limit exceeded",
            "rate_limited",
            status,
            excerpt(body),
            retry_after_seconds=hint,
        )
    if status >= 500:
        raise CrmError(f"amoCRM server error {status}", "unavailable", status, excerpt(body))
    if status != 200:
        raise CrmError(f"amoCRM answered HTTP {status}", "bad_response", status, excerpt(body))
    try:
        document = response.json()
    except ValueError as exc:
        raise CrmError(
            "amoCRM sent a body that is not JSON", "bad_response", status, excerpt(body)
        ) from exc
    if not isinstance(document, dict):
        raise CrmError(
            "amoCRM sent JSON that is not an object", "bad_response", status, excerpt(body)
        )
    return document


def _retry_after_from_body(response: httpx2.Response) -> float | None:
    """amoCRM's 429 body carries `retry_after` (seconds)."""
    try:
        document = response.json()
    except ValueError:
        return None
    value = _as_dict(document).get("retry_after")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None
