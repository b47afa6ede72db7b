"""OpenAI's File and Batch objects, and list pages, from the store's rows."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from exgen.daemon.gateway.errors import ApiError

BATCH_TIMES = (
    "created_at",
    "expires_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def file_object(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(row: sqlite3.Row) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": json.loads(row["errors"]) if row["errors"] else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
    }
    doc.update({name: row[name] for name in BATCH_TIMES})
    doc["request_counts"] = {
        "total": row["total"],
        "completed": row["completed"],
        "failed": row["failed"],
    }
    doc["usage"] = {
        "input_tokens": row["input_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": row["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": row["input_tokens"] + row["output_tokens"],
    }
    doc["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    return doc


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def page_limit(limit: int, maximum: int) -> int:
    """A list's ``limit``, 1 to ``maximum`` as OpenAI's are; outside that a 400."""
    if not 1 <= limit <= maximum:
        raise ApiError(400, f"limit must be between 1 and {maximum}, got {limit}", param="limit")
    return limit


def descending(order: str) -> bool:
    if order not in ("asc", "desc"):
        raise ApiError(400, f'order must be "asc" or "desc", got {order!r}', param="order")
    return order == "desc"
