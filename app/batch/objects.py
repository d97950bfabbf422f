"""Files and batches as the OpenAI API shows them: ``file``, ``batch`` and list objects.

Times are whole seconds since the epoch (or null), as OpenAI's are.
"""

from __future__ import annotations

from typing import Any

from app.store.models import BatchRow, FileRow


def _seconds(ts: float | None) -> int | None:
    return None if ts is None else int(ts)


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.size, "created_at": int(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": _seconds(row.expires_at)}


def batch_object(row: BatchRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None if row.errors is None else {"object": "list", "data": row.errors},
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": int(row.created_at),
        "in_progress_at": _seconds(row.in_progress_at),
        "expires_at": _seconds(row.expires_at),
        "finalizing_at": _seconds(row.finalizing_at),
        "completed_at": _seconds(row.completed_at),
        "failed_at": _seconds(row.failed_at),
        "expired_at": _seconds(row.expired_at),
        "cancelling_at": _seconds(row.cancelling_at),
        "cancelled_at": _seconds(row.cancelled_at),
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.meta,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
