"""SettingsService: thin transport over capi_server.services.settings."""

from __future__ import annotations

from typing import Protocol

import grpc

from capi.v1 import settings_service_pb2 as pb
from capi.v1 import settings_service_pb2_grpc as pb_grpc
from capi_server.domain.crm import CrmFieldInfo
from capi_server.rpc import mapping
from capi_server.services.settings import SettingsService

Ctx = grpc.aio.ServicerContext


class CrmFieldLister(Protocol):
    async def list_fields(self, connection_id: int, entity_type: str) -> list[CrmFieldInfo]: ...


class SettingsServicer(pb_grpc.SettingsServiceServicer):
    def __init__(self, settings: SettingsService, crm: CrmFieldLister | None) -> None:
        self._settings = settings
        self._crm = crm

    async def CreateUserAccount(
        self,
        request: pb.CreateUserAccountRequest,
        context: Ctx[pb.CreateUserAccountRequest, pb.CreateUserAccountResponse],
    ) -> pb.CreateUserAccountResponse:
        account, token = mapping.user_account_in(request.user_account)
        created = await self._settings.create_user_account(account, token)
        return pb.CreateUserAccountResponse(user_account=mapping.user_account_out(created))

    async def UpdateUserAccount(
        self,
        request: pb.UpdateUserAccountRequest,
        context: Ctx[pb.UpdateUserAccountRequest, pb.UpdateUserAccountResponse],
    ) -> pb.UpdateUserAccountResponse:
        mapping.require_id(request.user_account.id, "user_account.id")
        account, token = mapping.user_account_in(request.user_account)
        paths = mapping.mask_paths(request.update_mask.paths)
        updated = await self._settings.update_user_account(account, token, paths)
        return pb.UpdateUserAccountResponse(user_account=mapping.user_account_out(updated))

    async def CreateAdAccount(
        self,
        request: pb.CreateAdAccountRequest,
        context: Ctx[pb.CreateAdAccountRequest, pb.CreateAdAccountResponse],
    ) -> pb.CreateAdAccountResponse:
        account, token = mapping.ad_account_in(request.ad_account, creating=True)
        created = await self._settings.create_ad_account(account, token)
        return pb.CreateAdAccountResponse(ad_account=mapping.ad_account_out(created))

    async def UpdateAdAccount(
        self,
        request: pb.UpdateAdAccountRequest,
        context: Ctx[pb.UpdateAdAccountRequest, pb.UpdateAdAccountResponse],
    ) -> pb.UpdateAdAccountResponse:
        mapping.require_id(request.ad_account.id, "ad_account.id")
        account, token = mapping.ad_account_in(request.ad_account, creating=False)
        paths = mapping.mask_paths(request.update_mask.paths)
        updated = await self._settings.update_ad_account(account, token, paths)
        return pb.UpdateAdAccountResponse(ad_account=mapping.ad_account_out(updated))

    async def CreateCrmConnection(
        self,
        request: pb.CreateCrmConnectionRequest,
        context: Ctx[pb.CreateCrmConnectionRequest, pb.CreateCrmConnectionResponse],
    ) -> pb.CreateCrmConnectionResponse:
        connection, token, app_token = mapping.crm_connection_in(
            request.crm_connection, creating=True
        )
        created = await self._settings.create_crm_connection(connection, token, app_token)
        return pb.CreateCrmConnectionResponse(crm_connection=mapping.crm_connection_out(created))

    async def UpdateCrmConnection(
        self,
        request: pb.UpdateCrmConnectionRequest,
        context: Ctx[pb.UpdateCrmConnectionRequest, pb.UpdateCrmConnectionResponse],
    ) -> pb.UpdateCrmConnectionResponse:
        mapping.require_id(request.crm_connection.id, "crm_connection.id")
        connection, token, app_token = mapping.crm_connection_in(
            request.crm_connection, creating=False
        )
        paths = mapping.mask_paths(request.update_mask.paths)
        updated = await self._settings.update_crm_connection(connection, token, app_token, paths)
        return pb.UpdateCrmConnectionResponse(crm_connection=mapping.crm_connection_out(updated))

    async def CreateDirection(
        self,
        request: pb.CreateDirectionRequest,
        context: Ctx[pb.CreateDirectionRequest, pb.CreateDirectionResponse],
    ) -> pb.CreateDirectionResponse:
        direction = mapping.direction_in(request.direction, creating=True)
        saved = await self._settings.create_direction(direction)
        return pb.CreateDirectionResponse(
            direction=mapping.direction_out(saved.direction), warnings=saved.warnings
        )

    async def GetDirection(
        self,
        request: pb.GetDirectionRequest,
        context: Ctx[pb.GetDirectionRequest, pb.GetDirectionResponse],
    ) -> pb.GetDirectionResponse:
        direction = await self._settings.get_direction(mapping.require_id(request.id, "id"))
        return pb.GetDirectionResponse(direction=mapping.direction_out(direction))

    async def UpdateDirection(
        self,
        request: pb.UpdateDirectionRequest,
        context: Ctx[pb.UpdateDirectionRequest, pb.UpdateDirectionResponse],
    ) -> pb.UpdateDirectionResponse:
        paths = mapping.mask_paths(request.update_mask.paths)
        incoming = mapping.direction_in(request.direction, creating=False)
        saved = await self._settings.update_direction(incoming, paths)
        return pb.UpdateDirectionResponse(
            direction=mapping.direction_out(saved.direction), warnings=saved.warnings
        )

    async def ListDirections(
        self,
        request: pb.ListDirectionsRequest,
        context: Ctx[pb.ListDirectionsRequest, pb.ListDirectionsResponse],
    ) -> pb.ListDirectionsResponse:
        limit, after = mapping.parse_page(request.page_size, request.page_token)
        owner = mapping.optional_id(request.user_account_id, "user_account_id")
        directions, next_after = await self._settings.list_directions(owner, after, limit)
        return pb.ListDirectionsResponse(
            directions=[mapping.direction_out(d) for d in directions],
            next_page_token=mapping.page_token(next_after),
        )

    async def ListPixelChoices(
        self,
        request: pb.ListPixelChoicesRequest,
        context: Ctx[pb.ListPixelChoicesRequest, pb.ListPixelChoicesResponse],
    ) -> pb.ListPixelChoicesResponse:
        owner = mapping.require_id(request.user_account_id, "user_account_id")
        choices = await self._settings.list_pixel_choices(owner)
        return pb.ListPixelChoicesResponse(
            choices=[
                pb.PixelChoice(pixel_id=pixel, direction_names=names)
                for pixel, names in choices.choices
            ],
            warning=choices.warning,
        )

    async def ListCrmFields(
        self,
        request: pb.ListCrmFieldsRequest,
        context: Ctx[pb.ListCrmFieldsRequest, pb.ListCrmFieldsResponse],
    ) -> pb.ListCrmFieldsResponse:
        if self._crm is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListCrmFields is not available")
        assert self._crm is not None
        connection_id = mapping.require_id(request.crm_connection_id, "crm_connection_id")
        fields = await self._crm.list_fields(connection_id, request.entity_type)
        return pb.ListCrmFieldsResponse(
            fields=[
                pb.CrmFieldInfo(
                    field_id=f.field_id,
                    field_name=f.field_name,
                    field_type=f.field_type,
                    enums=[pb.CrmEnum(enum_id=i, enum_value=v) for i, v in f.enums],
                )
                for f in fields
            ]
        )
