"""AsyncCapiClient: the asyncio client (grpc.aio). Requests come from `_requests`."""

# `timeout=` is the gRPC deadline sent to the server (it cancels the call there too), not
# an asyncio timeout around the coroutine, so ASYNC109 does not apply.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
from google.protobuf.message import Message

from capi.v1 import capi_sender_service_pb2 as sender_pb
from capi.v1 import qualification_service_pb2 as qual_pb
from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as settings_pb
from capi_client import _requests as rq
from capi_client._channel import call_metadata, create_aio_channel
from capi_client._errors import error_from_rpc
from capi_client._methods import RPCS

ResponseT = TypeVar("ResponseT", bound=Message)

DEFAULT_TIMEOUT = 10.0


def _identity(data: bytes) -> bytes:
    return data


class AsyncCapiClient:
    """Asyncio client for the three capi.v1 services.

    Every method takes `timeout=` (seconds; default the client's `timeout`) and
    `request_id=` (sent as x-request-id) and raises a `CapiError` subclass on failure.

        async with AsyncCapiClient("capi:50051", token="...") as capi:
            await capi.send_conversion("qualified", instance_name="inst", contact_phone="7701...")
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """`wait_for_ready=True` queues calls while the server is unreachable (up to the
        deadline) instead of failing fast with Unavailable. `channel` replaces the built one
        (for tests or custom options); the client then still closes it."""
        self.target = target
        self.timeout = timeout
        self._token = token
        self._wait_for_ready = wait_for_ready
        self._channel = channel or create_aio_channel(target, tls=tls, ca_file=ca_file)
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _multicallable(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        call = self._calls.get(name)
        if call is None:
            rpc = RPCS[name]
            call = self._channel.unary_unary(
                rpc.path,
                request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString,
            )
            self._calls[name] = call
        return call

    async def _invoke(
        self,
        call: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: object,
        timeout: float | None,
        request_id: str | None,
    ) -> Any:
        try:
            return await call(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=call_metadata(self._token, request_id),
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def _call(
        self,
        name: str,
        request: Message,
        response_type: type[ResponseT],
        timeout: float | None,
        request_id: str | None,
    ) -> ResponseT:
        response = await self._invoke(self._multicallable(name), request, timeout, request_id)
        return cast(ResponseT, response)

    # health

    async def health(
        self, service: str = "", *, timeout: float | None = None, request_id: str | None = None
    ) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        call = self._channel.unary_unary(
            rq.HEALTH_CHECK_PATH, request_serializer=_identity, response_deserializer=_identity
        )
        raw = await self._invoke(call, rq.health_request(service), timeout, request_id)
        return rq.health_status(raw)

    # QualificationService

    async def ingest_message(
        self,
        *,
        instance_name: str | None = None,
        contact_phone: str | None = None,
        message_id: str | None = None,
        text: str | None = None,
        from_me: bool = False,
        sent_at: datetime | None = None,
        ctwa_clid: str | None = None,
        direction_id: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.IngestMessageResponse:
        """Stores one WhatsApp message given field by field. Idempotent by message_id."""
        request = rq.ingest_message(
            instance_name=instance_name,
            contact_phone=contact_phone,
            message_id=message_id,
            text=text,
            from_me=from_me,
            sent_at=sent_at,
            ctwa_clid=ctwa_clid,
            direction_id=direction_id,
        )
        return await self._call(
            "IngestMessage", request, qual_pb.IngestMessageResponse, timeout, request_id
        )

    async def ingest_evolution_webhook(
        self,
        raw_json: str | bytes | Mapping[str, Any],
        *,
        instance_name: str | None = None,
        direction_id: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.IngestMessageResponse:
        """Forwards an Evolution API / WhatsApp Cloud API webhook body unchanged."""
        request = rq.ingest_evolution_webhook(
            raw_json, instance_name=instance_name, direction_id=direction_id
        )
        return await self._call(
            "IngestMessage", request, qual_pb.IngestMessageResponse, timeout, request_id
        )

    async def analyze_dialog(
        self,
        dialog_id: str | None = None,
        *,
        instance_name: str | None = None,
        contact_phone: str | None = None,
        dry_run: bool = False,
        force: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.AnalyzeDialogResponse:
        """Judges a dialog and sends the levels it reached (each at most once)."""
        request = rq.analyze_dialog(
            dialog_id,
            instance_name=instance_name,
            contact_phone=contact_phone,
            dry_run=dry_run,
            force=force,
        )
        return await self._call(
            "AnalyzeDialog", request, qual_pb.AnalyzeDialogResponse, timeout, request_id
        )

    async def review_dialog_level(
        self,
        dialog_id: str,
        level: rq.EnumInput,
        approve: bool,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.ReviewDialogLevelResponse:
        """Sends (approve=True) or drops a level held for review."""
        request = rq.review_dialog_level(dialog_id, level, approve)
        return await self._call(
            "ReviewDialogLevel", request, qual_pb.ReviewDialogLevelResponse, timeout, request_id
        )

    async def check_crm_fields(
        self,
        direction_id: str,
        entity_type: str,
        entity_id: str | None = None,
        *,
        contact_phone: str | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.CheckCrmFieldsResponse:
        """Reads a CRM entity's live fields and sends the matched levels."""
        request = rq.check_crm_fields(
            direction_id, entity_type, entity_id, contact_phone=contact_phone, dry_run=dry_run
        )
        return await self._call(
            "CheckCrmFields", request, qual_pb.CheckCrmFieldsResponse, timeout, request_id
        )

    async def handle_crm_webhook(
        self,
        body: bytes | str,
        content_type: str,
        crm_connection_id: str | None = None,
        dry_run: bool = False,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.HandleCrmWebhookResponse:
        """Forwards an amoCRM / Bitrix24 webhook exactly as received."""
        request = rq.handle_crm_webhook(body, content_type, crm_connection_id, dry_run)
        return await self._call(
            "HandleCrmWebhook", request, qual_pb.HandleCrmWebhookResponse, timeout, request_id
        )

    async def reconcile_crm(
        self,
        crm_connection_id: str,
        *,
        since: datetime | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.ReconcileCrmResponse:
        """Checks CRM entities changed since `since` (default: the last run)."""
        request = rq.reconcile_crm(crm_connection_id, since=since, dry_run=dry_run)
        return await self._call(
            "ReconcileCrm", request, qual_pb.ReconcileCrmResponse, timeout, request_id
        )

    async def generate_qualification_prompt(
        self,
        direction_id: str,
        business_description: str,
        *,
        language: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> qual_pb.GenerateQualificationPromptResponse:
        """Writes the direction's qualification prompt with the LLM. Never retried."""
        request = rq.generate_qualification_prompt(
            direction_id, business_description, language=language
        )
        return await self._call(
            "GenerateQualificationPrompt",
            request,
            qual_pb.GenerateQualificationPromptResponse,
            timeout,
            request_id,
        )

    # CapiSenderService

    async def send_conversion(
        self,
        level: rq.EnumInput,
        dialog_id: str | None = None,
        *,
        instance_name: str | None = None,
        contact_phone: str | None = None,
        event_time: datetime | None = None,
        value: float | None = None,
        currency: str | None = None,
        test_event_code: str | None = None,
        dry_run: bool = False,
        direction_id: str | None = None,
        email: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> sender_pb.SendConversionResponse:
        """Sends a level (1-3, "qualified", "LEVEL_QUALIFIED") and any unsent lower level."""
        request = rq.send_conversion(
            level,
            dialog_id,
            instance_name=instance_name,
            contact_phone=contact_phone,
            event_time=event_time,
            value=value,
            currency=currency,
            test_event_code=test_event_code,
            dry_run=dry_run,
            direction_id=direction_id,
            email=email,
        )
        return await self._call(
            "SendConversion", request, sender_pb.SendConversionResponse, timeout, request_id
        )

    async def get_dialog_status(
        self,
        dialog_id: str | None = None,
        *,
        instance_name: str | None = None,
        contact_phone: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> sender_pb.GetDialogStatusResponse:
        """Which levels of a dialog were sent, when, with which event_id."""
        request = rq.get_dialog_status(
            dialog_id, instance_name=instance_name, contact_phone=contact_phone
        )
        return await self._call(
            "GetDialogStatus", request, sender_pb.GetDialogStatusResponse, timeout, request_id
        )

    async def list_events(
        self,
        *,
        direction_id: str | None = None,
        status: rq.EnumInput | None = None,
        level: rq.EnumInput | None = None,
        dialog_id: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> sender_pb.ListEventsResponse:
        """One page of the event log, newest first."""
        request = rq.list_events(
            direction_id=direction_id,
            status=status,
            level_=level,
            dialog_id=dialog_id,
            start_time=start_time,
            end_time=end_time,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(
            "ListEvents", request, sender_pb.ListEventsResponse, timeout, request_id
        )

    async def iter_events(
        self,
        *,
        direction_id: str | None = None,
        status: rq.EnumInput | None = None,
        level: rq.EnumInput | None = None,
        dialog_id: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[res.EventLogEntry]:
        """Every matching log row, fetching pages as needed (each page has its own deadline)."""
        token = ""
        while True:
            page = await self.list_events(
                direction_id=direction_id,
                status=status,
                level=level,
                dialog_id=dialog_id,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for event in page.events:
                yield event
            token = page.next_page_token
            if not token:
                return

    async def retry_events(
        self,
        event_ids: Sequence[str] = (),
        *,
        direction_id: str | None = None,
        status: rq.EnumInput | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> sender_pb.RetryEventsResponse:
        """Re-queues failed events by id, or all of a direction with `status` (default error)."""
        request = rq.retry_events(event_ids, direction_id=direction_id, status=status)
        return await self._call(
            "RetryEvents", request, sender_pb.RetryEventsResponse, timeout, request_id
        )

    async def diagnose(
        self, direction_id: str, *, timeout: float | None = None, request_id: str | None = None
    ) -> sender_pb.DiagnoseResponse:
        """Runs the troubleshooting checklist for a direction."""
        return await self._call(
            "Diagnose",
            rq.diagnose(direction_id),
            sender_pb.DiagnoseResponse,
            timeout,
            request_id,
        )

    async def get_optimization_advice(
        self, direction_id: str, *, timeout: float | None = None, request_id: str | None = None
    ) -> sender_pb.GetOptimizationAdviceResponse:
        """Which event to optimise the ads for."""
        return await self._call(
            "GetOptimizationAdvice",
            rq.get_optimization_advice(direction_id),
            sender_pb.GetOptimizationAdviceResponse,
            timeout,
            request_id,
        )

    # SettingsService

    async def create_user_account(
        self,
        name: str,
        *,
        access_token: str | None = None,
        default_region: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.CreateUserAccountResponse:
        request = rq.create_user_account(
            name, access_token=access_token, default_region=default_region
        )
        return await self._call(
            "CreateUserAccount", request, settings_pb.CreateUserAccountResponse, timeout, request_id
        )

    async def update_user_account(
        self,
        user_account_id: str,
        *,
        name: str | None = None,
        access_token: str | None = None,
        default_region: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.UpdateUserAccountResponse:
        """Changes the fields passed (not None); the update mask names exactly them."""
        request = rq.update_user_account(
            user_account_id, name=name, access_token=access_token, default_region=default_region
        )
        return await self._call(
            "UpdateUserAccount", request, settings_pb.UpdateUserAccountResponse, timeout, request_id
        )

    async def create_ad_account(
        self,
        user_account_id: str,
        name: str,
        *,
        access_token: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.CreateAdAccountResponse:
        request = rq.create_ad_account(user_account_id, name, access_token=access_token)
        return await self._call(
            "CreateAdAccount", request, settings_pb.CreateAdAccountResponse, timeout, request_id
        )

    async def update_ad_account(
        self,
        ad_account_id: str,
        *,
        name: str | None = None,
        access_token: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.UpdateAdAccountResponse:
        """Changes the fields passed (not None), for example to refresh the token."""
        request = rq.update_ad_account(ad_account_id, name=name, access_token=access_token)
        return await self._call(
            "UpdateAdAccount", request, settings_pb.UpdateAdAccountResponse, timeout, request_id
        )

    async def create_crm_connection(
        self,
        user_account_id: str,
        crm_type: rq.EnumInput,
        base_url: str,
        *,
        access_token: str | None = None,
        application_token: str | None = None,
        reconcile_interval_seconds: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.CreateCrmConnectionResponse:
        """`crm_type`: "amocrm", "bitrix24" or the CrmType number."""
        request = rq.create_crm_connection(
            user_account_id,
            crm_type,
            base_url,
            access_token=access_token,
            application_token=application_token,
            reconcile_interval_seconds=reconcile_interval_seconds,
        )
        return await self._call(
            "CreateCrmConnection",
            request,
            settings_pb.CreateCrmConnectionResponse,
            timeout,
            request_id,
        )

    async def update_crm_connection(
        self,
        crm_connection_id: str,
        *,
        base_url: str | None = None,
        access_token: str | None = None,
        application_token: str | None = None,
        reconcile_interval_seconds: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.UpdateCrmConnectionResponse:
        request = rq.update_crm_connection(
            crm_connection_id,
            base_url=base_url,
            access_token=access_token,
            application_token=application_token,
            reconcile_interval_seconds=reconcile_interval_seconds,
        )
        return await self._call(
            "UpdateCrmConnection",
            request,
            settings_pb.UpdateCrmConnectionResponse,
            timeout,
            request_id,
        )

    async def create_direction(
        self,
        direction: res.Direction,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.CreateDirectionResponse:
        return await self._call(
            "CreateDirection",
            rq.create_direction(direction),
            settings_pb.CreateDirectionResponse,
            timeout,
            request_id,
        )

    async def get_direction(
        self, direction_id: str, *, timeout: float | None = None, request_id: str | None = None
    ) -> settings_pb.GetDirectionResponse:
        return await self._call(
            "GetDirection",
            rq.get_direction(direction_id),
            settings_pb.GetDirectionResponse,
            timeout,
            request_id,
        )

    async def update_direction(
        self,
        direction: res.Direction,
        update_mask: Sequence[str],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.UpdateDirectionResponse:
        """Changes the fields named by `update_mask`, e.g. ["pixel_id", "capi.enabled"]."""
        return await self._call(
            "UpdateDirection",
            rq.update_direction(direction, update_mask),
            settings_pb.UpdateDirectionResponse,
            timeout,
            request_id,
        )

    async def list_directions(
        self,
        *,
        user_account_id: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.ListDirectionsResponse:
        """One page of directions, oldest first."""
        request = rq.list_directions(
            user_account_id=user_account_id, page_size=page_size, page_token=page_token
        )
        return await self._call(
            "ListDirections", request, settings_pb.ListDirectionsResponse, timeout, request_id
        )

    async def iter_directions(
        self,
        *,
        user_account_id: str | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[res.Direction]:
        """Every direction, fetching pages as needed."""
        token = ""
        while True:
            page = await self.list_directions(
                user_account_id=user_account_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for direction in page.directions:
                yield direction
            token = page.next_page_token
            if not token:
                return

    async def list_pixel_choices(
        self, user_account_id: str, *, timeout: float | None = None, request_id: str | None = None
    ) -> settings_pb.ListPixelChoicesResponse:
        return await self._call(
            "ListPixelChoices",
            rq.list_pixel_choices(user_account_id),
            settings_pb.ListPixelChoicesResponse,
            timeout,
            request_id,
        )

    async def list_crm_fields(
        self,
        crm_connection_id: str,
        entity_type: str,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> settings_pb.ListCrmFieldsResponse:
        return await self._call(
            "ListCrmFields",
            rq.list_crm_fields(crm_connection_id, entity_type),
            settings_pb.ListCrmFieldsResponse,
            timeout,
            request_id,
        )
