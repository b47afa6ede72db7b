"""The Files and Batches endpoints of OpenAI's Batch API.

An upload is counted as it streams in (413 past ``http_max_file_bytes``), spooled by
Starlette's multipart parser, then copied into the state directory in a thread,
fsynced and renamed into place: a file the store lists is whole on disk.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from exgen.daemon.gateway.completions import json_object
from exgen.daemon.gateway.errors import ApiError, not_found
from exgen.daemon.gateway.objects import batch_object, descending, file_object, page, page_limit
from exgen.daemon.gateway.routes_openai import read_body
from exgen.daemon.gateway.store import Store

if TYPE_CHECKING:
    from exgen.daemon.gateway.state import Gateway

router = APIRouter()
PURPOSES = ("batch",)  # what may be uploaded; batch outputs are written by us
MAX_PAGE = 100  # batches a page, as OpenAI's
MAX_FILES_PAGE = 10_000  # files a page, as OpenAI's (also its default)
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file's bytes


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# --- files ---------------------------------------------------------------------------


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    gateway = _gateway(request)
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        message = (
            f"The upload must be multipart/form-data (a purpose and a file field), not {kind!r}"
        )
        raise ApiError(400, message, param="file")
    limit = gateway.options.max_file_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _file_too_large(limit)
    parser = MultiPartParser(
        request.headers, _counted(request.stream(), limit + MULTIPART_OVERHEAD), max_files=1
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"The upload is not valid multipart/form-data: {exc.message}") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose {purpose!r}: only 'batch' is supported", param="purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "file is missing (a multipart file field)", param="file")
        file_id = f"file-{uuid.uuid4().hex}"
        path = gateway.store.files_dir / f"{file_id}.jsonl"
        size = await run_in_threadpool(_save, upload.file, path)
        if size > limit:
            path.unlink()
            raise _file_too_large(limit)
        gateway.store.add_file(file_id, str(purpose), upload.filename or "upload.jsonl", size, path)
    finally:
        await form.close()
    row = gateway.store.get_file(file_id)
    assert row is not None
    return file_object(row)


def _file_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than {limit} bytes (http_max_file_bytes)")


async def _counted(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The upload is larger than {limit} bytes (http_max_file_bytes)")
        yield chunk


def _save(source: IO[bytes], path: Path) -> int:
    partial = path.with_suffix(".part")
    source.seek(0)
    with open(partial, "wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return path.stat().st_size


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = MAX_FILES_PAGE,
    after: str | None = None,
    order: str = "desc",
) -> Any:
    store = _gateway(request).store
    cursor = _cursor(store, "files", after)
    limit = page_limit(limit, MAX_FILES_PAGE)
    rows = store.list_files(purpose, cursor, descending(order), limit + 1)
    return page([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _cursor(store: Store, table: str, after: str | None) -> int | None:
    """The rowid an ``after`` id stands for; an id that names nothing is a 400, not an
    empty page that would end a caller's listing early without a word."""
    if after is None:
        return None
    rowid = store.rowid(table, after)
    if rowid is None:
        what = {"files": "file", "batches": "batch"}[table]
        raise ApiError(400, f"after: no {what} with id {after!r}", param="after")
    return rowid


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    return file_object(_file_row(request, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    row = _file_row(request, file_id)
    return FileResponse(row["path"], media_type="application/jsonl", filename=row["filename"])


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    gateway = _gateway(request)
    row = _file_row(request, file_id)
    readers = gateway.store.batches_reading(file_id)
    if readers:
        message = f"File {file_id} is the input of unfinished batch {readers[0]}: cancel it first"
        raise ApiError(409, message, param="file_id")
    gateway.store.delete_file(file_id)
    Path(row["path"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def _file_row(request: Request, file_id: str) -> Any:
    row = _gateway(request).store.get_file(file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


# --- batches -------------------------------------------------------------------------


@router.post("/v1/batches")
async def create_batch(request: Request) -> dict[str, Any]:
    gateway = _gateway(request)
    body = json_object(await read_body(request, gateway.options.max_body_bytes))
    return gateway.batches.create(body)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Any:
    store = _gateway(request).store
    cursor = _cursor(store, "batches", after)
    limit = page_limit(limit, MAX_PAGE)
    rows = store.list_batches(cursor, True, limit + 1)
    return page([batch_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return _gateway(request).batches.get(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return _gateway(request).batches.cancel(batch_id)
