"""The job store: SQLite (WAL) for files, batches and per-line state; JSONL on disk.

Layout of the state directory::

    exgen.db                    files, batches, lines (this module)
    files/<file id>.jsonl       uploaded input files
    batches/<batch id>/output.jsonl, errors.jsonl   appended while the batch runs

Durability contract (batches.py relies on it): a line is marked done in ``lines``
in the same transaction that moves the batch's committed byte offsets past its
output line, and only after that output is flushed and fsynced. A restart truncates
each output file to its committed offset and runs every line not marked done, so
each custom_id ends up in the output exactly once.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

PENDING, OK, FAILED = 0, 1, 2  # a line's state
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, metadata TEXT,
    model TEXT, created_at INTEGER NOT NULL, expires_at INTEGER,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, errors TEXT,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    out_bytes INTEGER NOT NULL DEFAULT 0, err_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, offset INTEGER NOT NULL,
    custom_id TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
"""


def now_s() -> int:
    return int(time.time())


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives the process's death (SIGKILL); the
    # output files are fsynced before their offsets are committed, so even a power
    # cut leaves the files no shorter than the offsets say.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class StateDirInUse(OSError):
    """Another gateway runs on this state directory: two would run each batch twice."""


def lock_exclusively(path: Path) -> IO[bytes]:
    """Held while the store is open; the kernel drops it when the process dies."""
    handle = open(path, "ab")  # noqa: SIM115 (kept open: it is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StateDirInUse(f"{path.parent} is in use by another exgen gateway") from None
    return handle


class Store:
    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = lock_exclusively(self.root / "lock")
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "exgen.db"
        self.db = connect(self.db_path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id

    # --- files -------------------------------------------------------------------------

    def add_file(self, file_id: str, purpose: str, filename: str, size: int, path: Path) -> None:
        self.db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, purpose, filename, size, now_s(), str(path)),
        )

    def _by_id(self, table: str, ident: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            f"SELECT * FROM {table} WHERE id = ?", (ident,)
        ).fetchone()
        return row

    def get_file(self, file_id: str) -> sqlite3.Row | None:
        return self._by_id("files", file_id)

    def list_files(
        self, purpose: str | None, after: int | None, descending: bool, limit: int
    ) -> list[sqlite3.Row]:
        """A page of files; ``after``: the rowid (:meth:`rowid`) the previous page ended with."""
        where = {"purpose = ?": purpose} if purpose else {}
        return self._page("files", where, after, descending, limit)

    def delete_file(self, file_id: str) -> None:
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def batches_reading(self, file_id: str) -> list[str]:
        """Unfinished batches whose input this file is (it must not go from under them)."""
        marks = ",".join("?" * len(ACTIVE))
        rows = self.db.execute(
            f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({marks})",
            (file_id, *ACTIVE),
        )
        return [r["id"] for r in rows]

    # --- batches -----------------------------------------------------------------------

    def add_batch(self, fields: dict[str, Any]) -> None:
        names = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        self.db.execute(f"INSERT INTO batches ({names}) VALUES ({marks})", tuple(fields.values()))

    def get_batch(self, batch_id: str) -> sqlite3.Row | None:
        return self._by_id("batches", batch_id)

    def list_batches(self, after: int | None, descending: bool, limit: int) -> list[sqlite3.Row]:
        return self._page("batches", {}, after, descending, limit)

    def rowid(self, table: str, ident: str) -> int | None:
        """Where a row sits in creation order: the cursor of a page that ends with it."""
        row = self.db.execute(f"SELECT rowid FROM {table} WHERE id = ?", (ident,)).fetchone()
        return None if row is None else int(row[0])

    def _page(
        self,
        table: str,
        where: dict[str, Any],
        after: int | None,
        descending: bool,
        limit: int,
    ) -> list[sqlite3.Row]:
        """Rows in creation order (rowid: ids are random), past the cursor ``after``."""
        conditions = dict(where)
        if after is not None:
            conditions["rowid < ?" if descending else "rowid > ?"] = after
        clause = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        order = "DESC" if descending else "ASC"
        sql = f"SELECT * FROM {table} {clause} ORDER BY rowid {order} LIMIT ?"
        return self.db.execute(sql, (*conditions.values(), limit)).fetchall()

    def unfinished_batches(self) -> list[str]:
        marks = ",".join("?" * len(ACTIVE))
        sql = f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY rowid"
        return [r["id"] for r in self.db.execute(sql, ACTIVE)]

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"UPDATE batches SET {sets} WHERE id = ?", (*fields.values(), batch_id))

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """A status change, stamped with its ``<status>_at`` time."""
        self.update_batch(batch_id, status=status, **{f"{status}_at": now_s()}, **fields)

    def fail_batch(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        document = json.dumps({"object": "list", "data": errors})
        self.set_status(batch_id, "failed", errors=document)

    # --- lines ---------------------------------------------------------------------------

    def pending_lines(self, batch_id: str, after: int, limit: int) -> list[tuple[int, int]]:
        """(line_no, offset) of lines not yet done, from line ``after`` + 1 on."""
        rows = self.db.execute(
            "SELECT line_no, offset FROM lines WHERE batch_id = ? AND state = ? "
            "AND line_no > ? ORDER BY line_no LIMIT ?",
            (batch_id, PENDING, after, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def iter_pending(self, batch_id: str, chunk: int = 1000) -> Iterator[tuple[int, int]]:
        after = 0
        while rows := self.pending_lines(batch_id, after, chunk):
            yield from rows
            after = rows[-1][0]

    def commit_progress(
        self, batch_id: str, states: Iterable[tuple[int, int]], counts: dict[str, int]
    ) -> None:
        """Lines done (``(state, line_no)``) and the batch's counters, in one transaction.

        ``counts``: increments of completed, failed, input_tokens, output_tokens, and
        the new out_bytes and err_bytes (absolute: the fsynced file sizes).
        """
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "UPDATE lines SET state = ? WHERE batch_id = ? AND line_no = ?",
                ((state, batch_id, line_no) for state, line_no in states),
            )
            self.db.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ?, "
                "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, "
                "out_bytes = ?, err_bytes = ? WHERE id = ?",
                (
                    counts["completed"],
                    counts["failed"],
                    counts["input_tokens"],
                    counts["output_tokens"],
                    counts["out_bytes"],
                    counts["err_bytes"],
                    batch_id,
                ),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def finalize(self, batch_id: str, status: str, files: list[tuple[str, str, Path]]) -> None:
        """The batch's output files registered and its final status, in one transaction.

        ``files``: (column, file id, path) for output_file_id / error_file_id.
        """
        self.db.execute("BEGIN")
        try:
            ids = {}
            for column, file_id, path in files:
                name = f"{batch_id}_{path.name}"
                self.add_file(file_id, "batch_output", name, path.stat().st_size, path)
                ids[column] = file_id
            self.set_status(batch_id, status, **ids)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
