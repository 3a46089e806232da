"""OpenAI's Files API for batch input: upload (multipart, `purpose` `batch`, a size limit,
JSONL checked line by line), list, retrieve, content, delete; each project sees only its
own files (another project's id is a 404, as a missing one)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from aicloud.api.deps import CloudDep, CurrentPrincipal
from aicloud.api.errors import APIError, invalid
from aicloud.files import InvalidFile, TooLarge
from aicloud.files.store import PURPOSES, FileView
from aicloud.services import Cloud

router = APIRouter(prefix="/v1")

UPLOAD_BODY: dict[str, Any] = {"openapi_extra": {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}}


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, view: FileView) -> FileObject:
        return cls(id=view.id, bytes=view.bytes, created_at=int(view.created_at.timestamp()),
                   filename=view.filename, purpose=view.purpose)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def no_such_file(file_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such File object: {file_id[:64]}", param=param,
                    code="not_found")


@router.post("/files", **UPLOAD_BODY)
async def upload_file(request: Request, principal: CurrentPrincipal,
                      cloud: CloudDep) -> FileObject:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid("upload the file as multipart/form-data with fields 'file' and "
                      "'purpose'", "file")
    try:
        async with request.form(max_files=1, max_fields=4) as form:
            return await _store(form, principal.project_id, cloud)
    except MultiPartException as exc:
        raise invalid(f"the multipart body cannot be read: {exc.message}", "file") from None


async def _store(form: FormData, project_id: str, cloud: Cloud) -> FileObject:
    purpose, upload = form.get("purpose"), form.get("file")
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise invalid(f"purpose must be one of: {', '.join(PURPOSES)}", "purpose")
    if not isinstance(upload, UploadFile):
        raise invalid("the form has no file field 'file'", "file")
    try:
        view = await cloud.files.upload(project_id, purpose, upload.filename, upload.file)
    except TooLarge as exc:
        raise APIError(413, f"The file exceeds the {exc.limit} byte limit.",
                       param="file") from None
    except InvalidFile as exc:
        raise invalid(f"The file is not a valid batch input: {exc}", "file",
                      "invalid_file") from None
    return FileObject.of(view)


@router.get("/files")
async def list_files(principal: CurrentPrincipal, cloud: CloudDep,
                     purpose: str | None = None, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc") -> FileList:
    views = await cloud.files.find(principal.project_id, purpose, after, limit + 1,
                                   descending=order == "desc")
    data = [FileObject.of(v) for v in views[:limit]]
    return FileList(data=data, has_more=len(views) > limit,
                    first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, principal: CurrentPrincipal,
                        cloud: CloudDep) -> FileObject:
    view = await cloud.files.get(principal.project_id, file_id)
    if view is None:
        raise no_such_file(file_id)
    return FileObject.of(view)


@router.get("/files/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, principal: CurrentPrincipal,
                       cloud: CloudDep) -> FileResponse:
    view = await cloud.files.get(principal.project_id, file_id)
    path = None if view is None else cloud.files.storage.path(view.id)
    if path is None or not await asyncio.to_thread(path.is_file):
        raise no_such_file(file_id)
    return FileResponse(path, media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, principal: CurrentPrincipal,
                      cloud: CloudDep) -> FileDeleted:
    if not await cloud.files.delete(principal.project_id, file_id):
        raise no_such_file(file_id)
    return FileDeleted(id=file_id, deleted=True)
