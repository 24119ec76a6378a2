"""QualificationService methods of the CRM source (mixed into QualificationServicer).

Thin transport: ids are parsed here, everything else is validated by CrmService.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grpc

from capi.v1 import qualification_service_pb2 as pb
from capi.v1 import resources_pb2 as res
from capi_server.domain.crm import CrmFieldRule
from capi_server.domain.levels import Level
from capi_server.rpc import mapping
from capi_server.rpc.sender_servicer import event_result
from capi_server.services.crm import CrmService, EntityReport

Ctx = grpc.aio.ServicerContext


def level_matches(matches: Mapping[Level, Sequence[CrmFieldRule]]) -> list[pb.LevelMatch]:
    return [
        pb.LevelMatch(
            level=res.Level.ValueType(int(level)),
            matched_fields=[mapping.crm_field_out(rule) for rule in rules],
        )
        for level, rules in sorted(matches.items())
    ]


def entity_results(reports: Iterable[EntityReport]) -> list[pb.CrmEntityResult]:
    return [
        pb.CrmEntityResult(
            entity_type=report.entity_type,
            entity_id=report.entity_id,
            events=[event_result(outcome) for outcome in report.events],
            error=report.error,
            matches=level_matches(report.matches),
            skipped_reason=report.skipped_reason,
        )
        for report in reports
    ]


class CrmMethods:
    _crm: CrmService

    async def CheckCrmFields(
        self,
        request: pb.CheckCrmFieldsRequest,
        context: Ctx[pb.CheckCrmFieldsRequest, pb.CheckCrmFieldsResponse],
    ) -> pb.CheckCrmFieldsResponse:
        direction_id = mapping.require_id(request.direction_id, "direction_id")
        check = await self._crm.check_fields(
            direction_id,
            request.entity_type,
            request.entity_id,
            request.contact_phone,
            dry_run=request.dry_run,
        )
        return pb.CheckCrmFieldsResponse(
            matches=level_matches(check.matches),
            events=[event_result(outcome) for outcome in check.events],
            skipped_reason=check.skipped_reason,
            dialog_id=str(check.dialog_id or ""),
        )

    async def HandleCrmWebhook(
        self,
        request: pb.HandleCrmWebhookRequest,
        context: Ctx[pb.HandleCrmWebhookRequest, pb.HandleCrmWebhookResponse],
    ) -> pb.HandleCrmWebhookResponse:
        connection_id = mapping.optional_id(request.crm_connection_id, "crm_connection_id")
        reports = await self._crm.handle_webhook(
            request.body, request.content_type, connection_id, dry_run=request.dry_run
        )
        return pb.HandleCrmWebhookResponse(results=entity_results(reports))

    async def ReconcileCrm(
        self,
        request: pb.ReconcileCrmRequest,
        context: Ctx[pb.ReconcileCrmRequest, pb.ReconcileCrmResponse],
    ) -> pb.ReconcileCrmResponse:
        connection_id = mapping.require_id(request.crm_connection_id, "crm_connection_id")
        since = mapping.from_timestamp(request.since, request.HasField("since"))
        report = await self._crm.reconcile(connection_id, since, dry_run=request.dry_run)
        return pb.ReconcileCrmResponse(
            entities_checked=report.entities_checked, results=entity_results(report.results)
        )
