"""Fake amoCRM (REST v4) and Bitrix24 (incoming-webhook REST) servers on 127.0.0.1.

They start from the fixture bodies in shared/fixtures/crm, let tests change entities and
fields, script failure bursts (429, QUERY_LIMIT_EXCEEDED, 401, garbage) and record every
request (`fake.requests`, from FakeHttpServer).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from tests.fakes.http import FakeHttpServer, FakeResponse, RecordedRequest


def shared_dir() -> Path:
    """shared/ beside the repository (CI clones it there); CAPI_SHARED_DIR overrides."""
    override = os.environ.get("CAPI_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared"


def crm_fixtures_dir() -> Path:
    return shared_dir() / "fixtures" / "crm"


def load_crm_fixture(name: str) -> Any:
    """A JSON fixture parsed, or a .txt fixture as stripped text."""
    path = crm_fixtures_dir() / name
    if name.endswith(".json"):
        return json.loads(path.read_text(encoding="utf-8"))
    return path.read_text(encoding="utf-8").strip()


class _ScriptedFakeServer:
    """A FakeHttpServer whose answers can be preceded by a queue of scripted responses."""

    def __init__(self) -> None:
        self._script: deque[FakeResponse] = deque()
        self._lock = threading.Lock()
        self.server = FakeHttpServer(self._dispatch)

    def script(self, *responses: FakeResponse) -> None:
        """Serve these responses (one per request) before the normal routing resumes."""
        with self._lock:
            self._script.extend(responses)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    def _dispatch(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        if scripted is not None:
            return scripted
        return self.route(request)

    def route(self, request: RecordedRequest) -> FakeResponse:
        raise NotImplementedError

    def start(self) -> _ScriptedFakeServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _one(request: RecordedRequest, name: str) -> str | None:
    values = request.query.get(name)
    return values[0] if values else None


class FakeAmoCrm(_ScriptedFakeServer):
    """amoCRM REST v4: leads (with contacts), contacts, custom_fields, lead lists."""

    def __init__(self, token: str = "amo-test-token", fields_page_size: int = 50) -> None:
        super().__init__()
        self.token = token
        self.fields_page_size = fields_page_size
        lead = load_crm_fixture("amocrm_lead_get.json")
        contact = load_crm_fixture("amocrm_contact_get.json")
        self.leads: dict[str, dict[str, Any]] = {str(lead["id"]): lead}
        self.contacts: dict[str, dict[str, Any]] = {str(contact["id"]): contact}
        fields_page = load_crm_fixture("amocrm_leads_custom_fields.json")
        self.lead_fields: list[dict[str, Any]] = fields_page["_embedded"]["custom_fields"]
        self.contact_fields: list[dict[str, Any]] = [
            {"id": 178382, "name": "Telefone", "type": "multitext", "code": "PHONE", "enums": []},
            {"id": 178384, "name": "E-mail", "type": "multitext", "code": "EMAIL", "enums": []},
            {
                "id": 1271601,
                "name": "Origem do contato",
                "type": "select",
                "code": None,
                "enums": [
                    {"id": 920011, "value": "Instagram Ads", "sort": 1},
                    {"id": 920013, "value": "Site", "sort": 2},
                ],
            },
        ]

    # -- test controls -----------------------------------------------------------------

    def put_lead(self, lead: dict[str, Any]) -> None:
        self.leads[str(lead["id"])] = lead

    def add_leads(
        self, first_lead_id: int, first_contact_id: int, count: int, phone_prefix: str
    ) -> list[int]:
        """`count` copies of the fixture lead, each with its own main contact and phone
        (`phone_prefix` + "0007-0007" for the 8th); their ids."""
        template_lead = next(iter(self.leads.values()))
        template_contact = next(iter(self.contacts.values()))
        lead_ids = []
        for i in range(count):
            lead_id, contact_id = first_lead_id + i, first_contact_id + i
            contact = copy.deepcopy(template_contact)
            contact["id"] = contact_id
            phone = f"{phone_prefix}{i:04d}-{i:04d}"
            contact["custom_fields_values"][0]["values"] = [{"value": phone, "enum_code": "MOB"}]
            contact["custom_fields_values"][1]["values"] = []
            self.contacts[str(contact_id)] = contact
            lead = copy.deepcopy(template_lead)
            lead["id"] = lead_id
            lead["_embedded"]["contacts"] = [{"id": contact_id, "is_main": True}]
            self.put_lead(lead)
            lead_ids.append(lead_id)
        return lead_ids

    def copy_lead(self, new_id: int, updated_at: int) -> dict[str, Any]:
        """A copy of the fixture lead under another id (for list tests)."""
        lead = copy.deepcopy(next(iter(self.leads.values())))
        lead["id"], lead["updated_at"] = new_id, updated_at
        self.put_lead(lead)
        return lead

    def set_lead_field(
        self,
        lead_id: int | str,
        field_id: int,
        value: object,
        enum_id: int | None = None,
        field_type: str = "text",
    ) -> None:
        """Replace (or add) one custom field value of a lead."""
        lead = self.leads[str(lead_id)]
        item: dict[str, Any] = {"value": value}
        if enum_id is not None:
            item["enum_id"] = enum_id
        custom = [f for f in (lead.get("custom_fields_values") or []) if f["field_id"] != field_id]
        custom.append(
            {
                "field_id": field_id,
                "field_name": str(field_id),
                "field_code": None,
                "field_type": field_type,
                "values": [item],
            }
        )
        lead["custom_fields_values"] = custom

    def script_rate_limit(self, times: int, retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        body = {
            "title": "Too Many Requests",
            "type": "https://httpstatus.es/429",
            "status": 429,
            "detail": "Too many requests",
        }
        self.script(*(FakeResponse(429, body, headers) for _ in range(times)))

    def script_unauthorized(self, times: int = 1) -> None:
        body = load_crm_fixture("amocrm_error_401.json")
        self.script(*(FakeResponse(401, body) for _ in range(times)))

    # -- routing -----------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> FakeResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return FakeResponse(401, load_crm_fixture("amocrm_error_401.json"))
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] != ["api", "v4"] or len(parts) < 3:
            return FakeResponse(404, {"title": "Not Found", "status": 404})
        collection, rest = parts[2], parts[3:]
        store = {"leads": self.leads, "contacts": self.contacts}.get(collection)
        if store is None:
            return FakeResponse(404, {"title": "Not Found", "status": 404})
        if rest == ["custom_fields"]:
            fields = self.lead_fields if collection == "leads" else self.contact_fields
            return self._fields_page(request, collection, fields)
        if len(rest) == 1:
            entity = store.get(rest[0])
            return FakeResponse(204) if entity is None else self._hal(entity)
        if not rest:
            return self._list(request, collection, store)
        return FakeResponse(404, {"title": "Not Found", "status": 404})

    def _hal(self, body: dict[str, Any]) -> FakeResponse:
        return FakeResponse(200, body, {"Content-Type": "application/hal+json"})

    def _fields_page(
        self, request: RecordedRequest, collection: str, fields: list[dict[str, Any]]
    ) -> FakeResponse:
        page = int(_one(request, "page") or 1)
        size = min(int(_one(request, "limit") or 50), self.fields_page_size)
        chunk = fields[(page - 1) * size : page * size]
        if not chunk:
            return FakeResponse(204)
        page_count = (len(fields) + size - 1) // size
        links: dict[str, Any] = {
            "self": {"href": f"/api/v4/{collection}/custom_fields?page={page}"}
        }
        if page < page_count:
            links["next"] = {"href": f"/api/v4/{collection}/custom_fields?page={page + 1}"}
        return self._hal(
            {
                "_total_items": len(fields),
                "_page": page,
                "_page_count": page_count,
                "_links": links,
                "_embedded": {"custom_fields": chunk},
            }
        )

    def _list(
        self, request: RecordedRequest, collection: str, store: dict[str, dict[str, Any]]
    ) -> FakeResponse:
        since = int(_one(request, "filter[updated_at][from]") or 0)
        page = int(_one(request, "page") or 1)
        size = int(_one(request, "limit") or 50)
        matching = sorted(
            (e for e in store.values() if int(e.get("updated_at") or 0) >= since),
            key=lambda e: int(e.get("updated_at") or 0),
        )
        chunk = matching[(page - 1) * size : page * size]
        if not chunk:
            return FakeResponse(204)
        links: dict[str, Any] = {"self": {"href": f"/api/v4/{collection}?page={page}"}}
        if page * size < len(matching):
            links["next"] = {"href": f"/api/v4/{collection}?page={page + 1}"}
        return self._hal({"_page": page, "_links": links, "_embedded": {collection: chunk}})


class FakeBitrix24(_ScriptedFakeServer):
    """Bitrix24 REST behind /rest/{user_id}/{code}/: crm.{deal,lead,contact}.{get,fields,list}."""

    def __init__(self, user_id: str = "1", code: str = "testwebhookcode") -> None:
        super().__init__()
        self.user_id, self.code = user_id, code
        deal = load_crm_fixture("bitrix_crm_deal_get.json")["result"]
        contact = load_crm_fixture("bitrix_crm_contact_get.json")["result"]
        deal_fields = load_crm_fixture("bitrix_crm_deal_fields.json")["result"]
        self.entities: dict[str, dict[str, dict[str, Any]]] = {
            "deal": {deal["ID"]: deal},
            "lead": {},
            "contact": {contact["ID"]: contact},
        }
        contact_fields = {
            "ID": {"type": "integer", "title": "ID"},
            "NAME": {"type": "string", "title": "Name"},
            "PHONE": {"type": "crm_multifield", "isMultiple": True, "title": "Phone"},
            "UF_CRM_1720697698689": {
                "type": "enumeration",
                "title": "UF_CRM_1720697698689",
                "listLabel": "Origem do contato",
                "items": [
                    {"ID": "3201", "VALUE": "Instagram Ads"},
                    {"ID": "3203", "VALUE": "Site"},
                ],
            },
        }
        self.fields: dict[str, dict[str, Any]] = {
            "deal": deal_fields,
            "lead": {k: v for k, v in deal_fields.items() if k not in ("CATEGORY_ID", "STAGE_ID")},
            "contact": contact_fields,
        }

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/rest/{self.user_id}/{self.code}/"

    # -- test controls -----------------------------------------------------------------

    def put_entity(self, entity_type: str, entity: dict[str, Any]) -> None:
        self.entities[entity_type][str(entity["ID"])] = entity

    def set_deal_field(self, deal_id: int | str, field_id: str, value: object) -> None:
        self.entities["deal"][str(deal_id)][field_id] = value

    def set_contact_field(self, contact_id: int | str, field_id: str, value: object) -> None:
        self.entities["contact"][str(contact_id)][field_id] = value

    def script_query_limit(self, times: int) -> None:
        body = load_crm_fixture("bitrix_error_query_limit.json")
        self.script(*(FakeResponse(503, body) for _ in range(times)))

    def script_error(self, status: int, error: str, description: str = "", times: int = 1) -> None:
        body = {"error": error, "error_description": description}
        self.script(*(FakeResponse(status, body) for _ in range(times)))

    # -- routing -----------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> FakeResponse:
        parts = [p for p in request.path.split("/") if p]
        if len(parts) != 4 or parts[0] != "rest":
            return FakeResponse(404, "<html><body>Not Found</body></html>")
        if parts[1:3] != [self.user_id, self.code]:
            return FakeResponse(
                401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}
            )
        method = parts[3].removesuffix(".json")
        params: dict[str, Any] = {k: v[0] for k, v in request.query.items()}
        if request.body:
            params.update(request.json())
        pieces = method.split(".")
        if len(pieces) != 3 or pieces[0] != "crm" or pieces[1] not in self.entities:
            return FakeResponse(
                404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
            )
        entity_type, action = pieces[1], pieces[2]
        if action == "get":
            entity = self.entities[entity_type].get(str(params.get("id", "")))
            if entity is None:
                return FakeResponse(400, {"error": "", "error_description": "Not found"})
            return self._result(entity)
        if action == "fields":
            return self._result(self.fields[entity_type])
        if action == "list":
            return self._list(entity_type, params)
        return FakeResponse(
            404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
        )

    def _result(self, result: Any, **extra: Any) -> FakeResponse:
        return FakeResponse(200, {"result": result, **extra, "time": {"start": 0, "finish": 0}})

    def _list(self, entity_type: str, params: dict[str, Any]) -> FakeResponse:
        since_raw = params.get("filter[>DATE_MODIFY]")
        since = datetime.fromisoformat(since_raw).timestamp() if since_raw else 0.0
        start = int(params.get("start") or 0)
        rows = sorted(
            (
                e
                for e in self.entities[entity_type].values()
                if datetime.fromisoformat(e["DATE_MODIFY"]).timestamp() > since
            ),
            key=lambda e: datetime.fromisoformat(e["DATE_MODIFY"]).timestamp(),
        )
        page = [{"ID": e["ID"]} for e in rows[start : start + 50]]
        extra: dict[str, Any] = {"total": len(rows)}
        if start + 50 < len(rows):
            extra["next"] = start + 50
        return self._result(page, **extra)
