"""Running one batch: validate its file, run every line on the router in the ``batch``
lane, write each answer to output.jsonl or errors.jsonl, commit progress in steps,
finalize. Resumes where the committed output ends (store.py has the contract).

Shutdown (the task cancelled) commits what is done and leaves the rest pending for
the next run. Cancel and expiry stop sending, cancel what the router holds, and
answer every line not run with a ``batch_cancelled`` / ``batch_expired`` error line,
so the two files together account for every request of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from exgen.client import batchfile as B
from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.client import Result
from exgen.daemon.gateway import store as S
from exgen.daemon.gateway.options import GatewayOptions
from exgen.daemon.gateway.upstream import Upstream
from exgen.daemon.gateway.validate import validate_file

logger = logging.getLogger("exgen.gateway.runner")

COMMIT_EVERY_S = 0.5
COMMIT_EVERY_LINES = 2000
RETRY_AFTER_S = 1.0
STOP_MESSAGES = {
    "cancelled": "This request was not executed: the batch was cancelled.",
    "expired": "This request could not be executed before the completion window expired.",
}


@dataclass(slots=True)
class Failure:
    code: str
    message: str


@dataclass(slots=True)
class Unanswered:
    """A line answered without the router (what batchfile's writer needs of a result)."""

    id: str
    error: Failure
    text: str = ""
    finish_reason: str | None = P.FINISH_ERROR
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Outputs:
    """A batch's output.jsonl and errors.jsonl, appended; truncated to the committed
    sizes on open (bytes past them belong to lines that were never committed)."""

    def __init__(self, directory: Path, out_bytes: int, err_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = {"out": directory / "output.jsonl", "err": directory / "errors.jsonl"}
        self.sizes = {"out": out_bytes, "err": err_bytes}
        self.files: dict[str, BinaryIO] = {}
        for which, path in self.paths.items():
            path.touch()
            if path.stat().st_size > self.sizes[which]:
                os.truncate(path, self.sizes[which])
            self.files[which] = open(path, "ab")  # noqa: SIM115 (closed in close())

    def write(self, which: str, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self.files[which].write(data)
        self.sizes[which] += len(data)

    def sync(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(("completed", "failed", "input_tokens", "output_tokens"), 0)


class BatchRunner:
    def __init__(
        self, store: S.Store, upstream: Upstream, options: GatewayOptions, batch_id: str
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.options = options
        self.batch_id = batch_id
        self.stop_reason: str | None = None  # "cancelled" | "expired"
        self.pass_task: asyncio.Future[None] | None = None  # the pass that sends lines now
        self.sent: dict[str, B.BatchLine] = {}  # outstanding at the router, by custom_id
        self.states: list[tuple[int, int]] = []  # (state, line_no) done, not committed
        self.counts = _zero_counts()
        self.last_commit = time.monotonic()
        self.outputs: Outputs | None = None

    # --- the run -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self.commit()  # shutting down: what is done stays done, the rest runs later
            raise
        finally:
            self._close()

    async def _run(self) -> None:
        row = self._row()
        if row["status"] == "validating" and not await self._validate(row):
            return
        row = self._row()
        if row["expires_at"] is not None and row["expires_at"] <= S.now_s():
            self.stop_reason = self.stop_reason or "expired"
        if row["status"] == "cancelling":
            self.stop_reason = "cancelled"
        self.outputs = Outputs(
            self.store.batch_dir(self.batch_id), row["out_bytes"], row["err_bytes"]
        )
        while self.stop_reason is None and not await self._execute():
            await asyncio.sleep(RETRY_AFTER_S)
        self.commit()  # before reading what is still pending
        await self._answer_unsent()
        self.commit()
        self._finalize()

    def _row(self) -> Any:
        row = self.store.get_batch(self.batch_id)
        assert row is not None
        return row

    async def _validate(self, row: Any) -> bool:
        file = self.store.get_file(row["input_file_id"])
        if file is None:
            message = f"the input file {row['input_file_id']} no longer exists"
            self.store.fail_batch(self.batch_id, [{"code": "file_not_found", "message": message}])
            return False
        outcome = await asyncio.to_thread(
            validate_file,
            self.store.db_path,
            self.batch_id,
            Path(file["path"]),
            row["endpoint"],
            self.options.batch_max_lines,
        )
        if outcome.error_count:
            logger.info("batch %s failed validation: %d errors", self.batch_id, outcome.error_count)
            self.store.fail_batch(self.batch_id, outcome.errors)
            return False
        if self._row()["status"] == "cancelling":  # cancelled while we validated
            self.store.update_batch(self.batch_id, total=outcome.total)
        else:
            self.store.set_status(self.batch_id, "in_progress", total=outcome.total)
        logger.info("batch %s: %d requests, running", self.batch_id, outcome.total)
        return True

    async def _execute(self) -> bool:
        """Send every pending line and record every answer; False: retry after a pause.

        The pass is a task of its own so that :meth:`stop` can cancel it: the call on
        the shared client is abandoned, which cancels exactly this batch's lines at the
        router (another batch's lines with the same custom_id are not touched).
        """
        self.pass_task = asyncio.ensure_future(self._send_and_record())
        try:
            await self.pass_task
            return True
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.stop_reason is None or (current is not None and current.cancelling()):
                raise  # the gateway is stopping: the lines not answered run next time
            return True  # stopped: the lines not answered are answered as such
        except errors.ExgenError as exc:
            logger.warning("batch %s: %s; resuming in %.0fs", self.batch_id, exc, RETRY_AFTER_S)
            self.commit()
            return False
        finally:
            self.pass_task = None
            self.sent.clear()  # what was not answered is still pending in the store

    async def _send_and_record(self) -> None:
        results = self.upstream.client.iter_results(self._items(), priority="batch")
        async with contextlib.aclosing(results):
            async for result in results:
                self._record_result(result)
                self.commit_if_due()

    def _items(self) -> Iterator[dict[str, Any]]:
        """Pending lines, read back one at a time by offset; pulled as the window opens.

        Lines answered during this pass lie behind the pass's cursor, so they are not
        read again; a new pass starts after a commit, when none are uncommitted.
        """
        path = self._input_path()
        with open(path, "rb") as f:
            for line_no, offset in self.store.iter_pending(self.batch_id):
                if self.stop_reason is not None:
                    return
                line = self._read_line(f, line_no, offset)
                if line is not None:
                    self.sent[line.id] = line
                    yield line.to_item()

    def _input_path(self) -> Path:
        file = self.store.get_file(self._row()["input_file_id"])
        assert file is not None  # an input file cannot be deleted under a running batch
        return Path(file["path"])

    def _read_line(self, f: Any, line_no: int, offset: int) -> B.BatchLine | None:
        """The line as a request, or None once it is answered here (a bad body)."""
        f.seek(offset)
        entry = B.parse_line(f.readline(), line_no)
        if isinstance(entry, B.LineError):
            self._write("err", B.format_line_error(entry), S.FAILED, line_no)
            return None
        return entry

    # --- answers -------------------------------------------------------------------------

    def _record_result(self, result: Result) -> None:
        line = self.sent.pop(result.id, None)
        if line is None:
            return  # an answer for a line this pass did not send
        self._write_answer(line, result)

    def _write_answer(self, line: B.BatchLine, result: Result | Unanswered) -> None:
        # The served model wrote the text: its name goes in the body, not the request's.
        honest = dataclasses.replace(line, model=None)
        record = B.format_result(honest, result, default_model=self.upstream.model)
        ok = result.error is None
        self.counts["input_tokens"] += result.prompt_tokens
        self.counts["output_tokens"] += result.completion_tokens
        self._write("out" if ok else "err", record, S.OK if ok else S.FAILED, line.line_no)

    def _write(self, which: str, record: dict[str, Any], state: int, line_no: int) -> None:
        assert self.outputs is not None
        self.outputs.write(which, record)
        self.states.append((state, line_no))
        self.counts["completed" if state == S.OK else "failed"] += 1

    async def _answer_unsent(self) -> None:
        """Cancelled or expired: every line never run gets its error line."""
        if self.stop_reason is None:
            return
        failure = Failure(f"batch_{self.stop_reason}", STOP_MESSAGES[self.stop_reason])
        with open(self._input_path(), "rb") as f:
            for line_no, offset in self.store.iter_pending(self.batch_id):
                f.seek(offset)
                entry = B.parse_line(f.readline(), line_no)
                if isinstance(entry, B.LineError):
                    self._write("err", B.format_line_error(entry), S.FAILED, line_no)
                else:
                    self._write_answer(entry, Unanswered(entry.id, failure))
                if len(self.states) >= COMMIT_EVERY_LINES:
                    self.commit()
                    await asyncio.sleep(0)  # let requests in between chunks

    # --- commits and the end -----------------------------------------------------------

    def commit_if_due(self) -> None:
        due = time.monotonic() - self.last_commit >= COMMIT_EVERY_S
        if self.states and (due or len(self.states) >= COMMIT_EVERY_LINES):
            self.commit()

    def commit(self) -> None:
        """Output fsynced first, then lines and offsets in one transaction."""
        self.last_commit = time.monotonic()
        if not self.states or self.outputs is None:
            return
        self.outputs.sync()
        counts = {
            **self.counts,
            "out_bytes": self.outputs.sizes["out"],
            "err_bytes": self.outputs.sizes["err"],
        }
        self.store.commit_progress(self.batch_id, self.states, counts)
        self.states = []
        self.counts = _zero_counts()

    def _finalize(self) -> None:
        row = self._row()
        status = self.stop_reason or "completed"
        if status == "completed":
            self.store.set_status(self.batch_id, "finalizing")
        assert self.outputs is not None
        files = []
        if row["completed"]:
            files.append(("output_file_id", _file_id(), self.outputs.paths["out"]))
        if row["failed"]:
            files.append(("error_file_id", _file_id(), self.outputs.paths["err"]))
        self.store.finalize(self.batch_id, status, files)
        logger.info(
            "batch %s %s: %d completed, %d failed",
            self.batch_id,
            status,
            row["completed"],
            row["failed"],
        )

    def stop(self, reason: str) -> None:
        """Cancel or expire: send nothing more; what the router holds is cancelled there."""
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        if self.pass_task is not None:
            self.pass_task.cancel()

    def _close(self) -> None:
        if self.outputs is not None:
            self.outputs.close()
            self.outputs = None


def _file_id() -> str:
    return f"file-{uuid.uuid4().hex}"
