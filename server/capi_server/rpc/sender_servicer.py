"""CapiSenderService: thin transport over capi_server.services.sender."""

from __future__ import annotations

import json
from typing import Any

import grpc

from capi.v1 import capi_sender_service_pb2 as pb
from capi.v1 import capi_sender_service_pb2_grpc as pb_grpc
from capi.v1 import resources_pb2 as res
from capi_server.adapters.db.orm import CapiEventLogRow
from capi_server.domain.errors import InvalidArgument
from capi_server.domain.events import EventOutcome, EventStatus, SendOutcome
from capi_server.domain.levels import Level
from capi_server.rpc import mapping
from capi_server.services.diagnostics import DiagnosticsService, FindingStatus
from capi_server.services.sender import DialogRef, SenderService, SendOptions

Ctx = grpc.aio.ServicerContext

_OUTCOMES: dict[SendOutcome, res.SendOutcome.ValueType] = {
    SendOutcome.SENT: res.SEND_OUTCOME_SENT,
    SendOutcome.ALREADY_SENT: res.SEND_OUTCOME_ALREADY_SENT,
    SendOutcome.QUEUED: res.SEND_OUTCOME_QUEUED,
    SendOutcome.SKIPPED: res.SEND_OUTCOME_SKIPPED,
    SendOutcome.FAILED: res.SEND_OUTCOME_FAILED,
}
STATUSES: dict[EventStatus, res.EventStatus.ValueType] = {
    EventStatus.PENDING: res.EVENT_STATUS_PENDING,
    EventStatus.SUCCESS: res.EVENT_STATUS_SUCCESS,
    EventStatus.ERROR: res.EVENT_STATUS_ERROR,
    EventStatus.SKIPPED: res.EVENT_STATUS_SKIPPED,
}
_STATUS_IN = {v: k for k, v in STATUSES.items()}
_FINDING_STATUSES: dict[FindingStatus, pb.FindingStatus.ValueType] = {
    FindingStatus.OK: pb.FINDING_STATUS_OK,
    FindingStatus.WARN: pb.FINDING_STATUS_WARN,
    FindingStatus.FAIL: pb.FINDING_STATUS_FAIL,
}


def event_result(outcome: EventOutcome) -> res.EventResult:
    return res.EventResult(
        level=res.Level.ValueType(int(outcome.level)),
        event_name=outcome.event_name,
        event_id=outcome.event_id,
        outcome=_OUTCOMES[outcome.outcome],
        reason=outcome.reason,
        error_code=outcome.error_code or 0,
        error_subcode=outcome.error_subcode or 0,
        hint=outcome.hint,
        sent_at=mapping.timestamp(outcome.sent_at),
        log_id=str(outcome.log_id or ""),
    )


def dialog_ref(
    dialog_id: str, instance_name: str, contact_phone: str, direction_id: str = ""
) -> DialogRef:
    parsed = mapping.optional_id(dialog_id, "dialog_id")
    if parsed is None and not (instance_name.strip() or direction_id.strip()):
        raise InvalidArgument.field(
            "dialog_id", "name the dialog by dialog_id or by instance_name and contact_phone"
        )
    return DialogRef(
        dialog_id=parsed,
        instance_name=instance_name.strip() or None,
        contact_phone=contact_phone.strip() or None,
        direction_id=mapping.optional_id(direction_id, "direction_id"),
    )


def status_in(value: int, field: str) -> EventStatus | None:
    if value == res.EVENT_STATUS_UNSPECIFIED:
        return None
    if value not in _STATUS_IN:
        raise InvalidArgument.field(field, "is not a known EventStatus")
    return _STATUS_IN[res.EventStatus.ValueType(value)]


def log_entry(row: CapiEventLogRow) -> res.EventLogEntry:
    response: Any = row.facebook_response
    return res.EventLogEntry(
        id=str(row.id),
        direction_id=str(row.direction_id or ""),
        dialog_id=str(row.dialog_id or ""),
        lead_id=str(row.lead_id or ""),
        level=res.Level.ValueType(row.level),
        event_name=row.event_name,
        event_id=row.event_id or "",
        status=STATUSES[EventStatus(row.status)],
        error_code=row.error_code or 0,
        error_subcode=row.error_subcode or 0,
        error_message=row.error_message or "",
        hint=row.hint or "",
        facebook_response=json.dumps(response, ensure_ascii=False) if response else "",
        attempts=row.attempts,
        next_attempt_time=mapping.timestamp(row.next_attempt_at),
        create_time=mapping.timestamp(row.created_at),
        update_time=mapping.timestamp(row.updated_at),
        pixel_id=row.pixel_id or "",
        event_time=mapping.timestamp(row.event_time),
        source=row.source or "",
    )


class SenderServicer(pb_grpc.CapiSenderServiceServicer):
    def __init__(
        self, sender: SenderService, diagnostics: DiagnosticsService | None = None
    ) -> None:
        self._sender = sender
        self._diagnostics = diagnostics

    async def SendConversion(
        self,
        request: pb.SendConversionRequest,
        context: Ctx[pb.SendConversionRequest, pb.SendConversionResponse],
    ) -> pb.SendConversionResponse:
        ref = dialog_ref(
            request.dialog_id, request.instance_name, request.contact_phone, request.direction_id
        )
        level = mapping.parse_level(request.level)
        options = SendOptions(
            event_time=mapping.from_timestamp(request.event_time, request.HasField("event_time")),
            value=request.value if request.HasField("value") else None,
            currency=request.currency.strip() or None,
            test_event_code=request.test_event_code.strip() or None,
            dry_run=request.dry_run,
            email=request.email.strip() or None,
        )
        report = await self._sender.send(ref, level, options)
        return pb.SendConversionResponse(
            events=[event_result(o) for o in report.outcomes], dialog_id=str(report.dialog_id)
        )

    async def GetDialogStatus(
        self,
        request: pb.GetDialogStatusRequest,
        context: Ctx[pb.GetDialogStatusRequest, pb.GetDialogStatusResponse],
    ) -> pb.GetDialogStatusResponse:
        ref = dialog_ref(request.dialog_id, request.instance_name, request.contact_phone)
        ctx, levels = await self._sender.dialog_status(ref)
        return pb.GetDialogStatusResponse(
            dialog_id=str(ctx.dialog.id),
            direction_id=str(ctx.direction_id),
            has_ctwa_clid=bool(ctx.lead.ctwa_clid),
            levels=[
                pb.LevelStatus(
                    level=res.Level.ValueType(int(lvl)),
                    sent=sent,
                    sent_at=mapping.timestamp(sent_at),
                    event_id=event_id,
                    status=STATUSES[status] if status else res.EVENT_STATUS_UNSPECIFIED,
                )
                for lvl, sent, sent_at, event_id, status in levels
            ],
        )

    async def ListEvents(
        self,
        request: pb.ListEventsRequest,
        context: Ctx[pb.ListEventsRequest, pb.ListEventsResponse],
    ) -> pb.ListEventsResponse:
        limit, before = mapping.parse_page(request.page_size, request.page_token)
        rows = await self._sender.list_events(
            direction_id=mapping.optional_id(request.direction_id, "direction_id"),
            dialog_id=mapping.optional_id(request.dialog_id, "dialog_id"),
            status=status_in(request.status, "status"),
            level=mapping.parse_level(request.level) if request.level else None,
            start=mapping.from_timestamp(request.start_time, request.HasField("start_time")),
            end=mapping.from_timestamp(request.end_time, request.HasField("end_time")),
            before_id=before,
            limit=limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return pb.ListEventsResponse(
            events=[log_entry(r) for r in rows],
            next_page_token=mapping.page_token(rows[-1].id if more and rows else None),
        )

    async def RetryEvents(
        self,
        request: pb.RetryEventsRequest,
        context: Ctx[pb.RetryEventsRequest, pb.RetryEventsResponse],
    ) -> pb.RetryEventsResponse:
        ids = [
            mapping.require_id(value, f"event_ids[{i}]")
            for i, value in enumerate(request.event_ids)
        ]
        status = status_in(request.status, "status") or EventStatus.ERROR
        count = await self._sender.retry_events(
            ids, mapping.optional_id(request.direction_id, "direction_id"), status
        )
        return pb.RetryEventsResponse(requeued=count)

    async def Diagnose(
        self, request: pb.DiagnoseRequest, context: Ctx[pb.DiagnoseRequest, pb.DiagnoseResponse]
    ) -> pb.DiagnoseResponse:
        diagnostics = await self._require_diagnostics(context)
        findings = await diagnostics.diagnose(
            mapping.require_id(request.direction_id, "direction_id")
        )
        return pb.DiagnoseResponse(
            findings=[
                pb.Finding(
                    check=f.check, status=_FINDING_STATUSES[f.status], detail=f.detail, fix=f.fix
                )
                for f in findings
            ]
        )

    async def GetOptimizationAdvice(
        self,
        request: pb.GetOptimizationAdviceRequest,
        context: Ctx[pb.GetOptimizationAdviceRequest, pb.GetOptimizationAdviceResponse],
    ) -> pb.GetOptimizationAdviceResponse:
        diagnostics = await self._require_diagnostics(context)
        advice, counts = await diagnostics.advice(
            mapping.require_id(request.direction_id, "direction_id")
        )
        return pb.GetOptimizationAdviceResponse(
            recommended_level=mapping.level_out(advice.recommended_level),
            event_name=advice.event_name,
            reason=advice.reason,
            counts=[
                pb.LevelCount(
                    level=mapping.level_out(c.level),
                    event_name=c.event_name,
                    last_7_days=c.last_7_days,
                    previous_7_days=c.previous_7_days,
                )
                for c in counts
            ],
        )

    async def _require_diagnostics(self, context: Ctx[Any, Any]) -> DiagnosticsService:
        if self._diagnostics is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "diagnostics are not wired")
        assert self._diagnostics is not None
        return self._diagnostics


__all__ = ["Level", "SenderServicer", "dialog_ref", "event_result", "log_entry"]
