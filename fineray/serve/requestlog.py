"""The request log and `POST /v1/feedback` (opt-in: `fineray serve --log-requests URI`).

    ingress --record(rows)--> RequestLog (one replica) --every log_flush_s--> URI/requests/part-*.parquet
    ingress --feedback(item)-> RequestLog: checks the id and its key   -->    URI/feedback/part-*.parquet

Every response is logged PII-redacted (`fineray.train.pii`) with its id, the key that read it (`key_id`, a
digest prefix, never the key), the adapter version, rollout and variant. The log deployment keeps an index of
response ids (loaded from the existing log at start, ~200 bytes per response) so feedback is checked at once:
an unknown id is a 404, a response logged for another key a 403 (a key can only rate what it could read).
`fineray data from-feedback` (`fineray.serve.feedback`) turns the two tables into datasets.
"""

# No `from __future__ import annotations`: Serve deployments are built from the class at import time.
import asyncio
import json
import logging
import time
import uuid
from typing import Any

from ray import serve

from fineray.serve.protocol import APIError

__all__ = ["FEEDBACK", "REQUESTS", "FeedbackItem", "LogClient", "RequestLog", "parse_feedback", "read_table"]

log = logging.getLogger(__name__)
REQUESTS, FEEDBACK = "requests", "feedback"
_INDEX_COLUMNS = ["id", "key_id", "adapter", "version", "rollout", "variant"]


def read_table(uri: str, table: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row of a log table (`requests` or `feedback`) under `uri`, oldest part first."""
    import pyarrow.parquet as pq

    from fineray.base import storage

    fs, path = storage.open_fs(uri)
    rows: list[dict[str, Any]] = []
    for name in storage.listdir(fs, f"{path}/{table}"):
        if name.endswith(".parquet"):
            with fs.open_input_file(f"{path}/{table}/{name}") as f:
                rows.extend(pq.read_table(f, columns=columns).to_pylist())
    return rows


def _write_part(uri: str, table: str, rows: list[dict[str, Any]]) -> None:
    """One Parquet part, uploaded in one write (atomic on object stores, renamed into place locally)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fineray.base import storage

    fs, path = storage.open_fs(uri)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, compression="zstd")
    name = f"part-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    storage.atomic_write_bytes(fs, f"{path}/{table}/{name}", sink.getvalue().to_pybytes())


class FeedbackItem:
    """A validated feedback body."""

    def __init__(self, id: str, rating: float, correction: str | None, index: int):
        self.id, self.rating, self.correction, self.index = id, rating, correction, index


def parse_feedback(body: Any) -> FeedbackItem:
    """`{"id", "rating" in [-1, 1], "correction"?: str, "index"?: int}`; APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - {"id", "rating", "correction", "index"})
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    rid, rating, corr, idx = body.get("id"), body.get("rating"), body.get("correction"), body.get("index", 0)
    if not isinstance(rid, str) or not rid:
        raise APIError(400, "Invalid 'id': the id of a response (chatcmpl-... or cmpl-...) is required.", param="id")
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not -1 <= rating <= 1:
        raise APIError(400, "Invalid 'rating': a number from -1 (bad) to 1 (good) is required.", param="rating")
    if corr is not None and not isinstance(corr, str):
        raise APIError(400, "Invalid 'correction': must be a string (the answer the model should have given).",
                       param="correction")
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise APIError(400, "Invalid 'index': must be a choice index >= 0.", param="index")
    return FeedbackItem(rid, float(rating), corr, idx)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, num_replicas=1)
class RequestLog:
    """Buffers logged responses and feedback, writes them as Parquet parts, and answers "whose is this id"."""

    def __init__(self, uri: str, flush_s: float = 5.0):
        self.uri, self.flush_s = uri, flush_s
        self.pending: dict[str, list[dict[str, Any]]] = {REQUESTS: [], FEEDBACK: []}
        self.index: dict[str, tuple] = {}
        for row in read_table(uri, REQUESTS, _INDEX_COLUMNS):
            self.index[row["id"]] = tuple(row[c] for c in _INDEX_COLUMNS[1:])
        self._flusher: asyncio.Task | None = None
        log.info("request log %s: %d responses indexed", uri, len(self.index))

    def _start(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> int:
        """Write what is pending; returns the rows written."""
        written = 0
        for table in (REQUESTS, FEEDBACK):
            rows, self.pending[table] = self.pending[table], []
            if rows:
                try:
                    await asyncio.to_thread(_write_part, self.uri, table, rows)
                    written += len(rows)
                except Exception:  # keep them for the next try rather than lose them
                    log.exception("request log %s unwritable; keeping %d %s rows", self.uri, len(rows), table)
                    self.pending[table] = rows + self.pending[table]
        return written

    async def record(self, rows: list[dict[str, Any]]) -> None:
        self._start()
        for r in rows:
            self.index[r["id"]] = tuple(r[c] for c in _INDEX_COLUMNS[1:])
        self.pending[REQUESTS].extend(rows)

    async def feedback(self, item: dict[str, Any], key_id: str) -> dict[str, Any]:
        """Store feedback on a logged response; returns its labels, or `{"error": (status, message)}`."""
        self._start()
        known = self.index.get(item["id"])
        if known is None:
            return {"error": (404, f"No logged response with id '{item['id']}'.")}
        owner, adapter, version, rollout, variant = known
        if owner != key_id:
            return {"error": (403, "This key cannot rate that response: it was not returned to this key.")}
        labels = {"adapter": adapter, "version": version, "rollout": rollout, "variant": variant}
        self.pending[FEEDBACK].append({**item, **labels, "key_id": key_id, "created": time.time()})
        return labels

    def __del__(self) -> None:
        rows = self.pending[REQUESTS], self.pending[FEEDBACK]
        for table, part in zip((REQUESTS, FEEDBACK), rows):
            if part:
                try:
                    _write_part(self.uri, table, part)
                except Exception:  # shutting down: nothing else to do
                    log.debug("request log part lost at shutdown", exc_info=True)


class LogClient:
    """The ingress side: builds redacted log rows and talks to the `RequestLog` deployment."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def record(self, call: Any, rid: str, key_id: str, messages: list[dict[str, str]] | None,
                     prompt: str | None, choices: list[dict[str, Any]]) -> None:
        """Log one response (all its choices), PII-redacted, before its id reaches the client."""
        from fineray.train.pii import redact

        t = call.target
        def red(s: str | None) -> str | None:
            return None if s is None else redact(s)[0]

        texts = [red(c.get("text", "")) for c in sorted(choices, key=lambda c: c["index"])]
        row = {
            "id": rid, "created": time.time(), "endpoint": call.endpoint, "key_id": key_id,
            "model": t.requested, "adapter": t.name, "version": t.version, "ref": t.label,
            "rollout": t.rollout or "", "variant": t.label if t.rollout else "",
            "messages": None if messages is None else json.dumps([{**m, "content": red(m["content"])}
                                                                   for m in messages]),
            "prompt": red(prompt), "response": texts[0] if texts else "", "choices": texts,
            "finish_reason": choices[0].get("finish_reason") if choices else None,
            "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
            "latency_s": time.perf_counter() - call.t0,
        }
        try:
            await self.handle.record.remote([row])
        except Exception:
            log.warning("request log unreachable; response %s not logged", rid, exc_info=True)

    async def feedback(self, body: Any, key_id: str) -> dict[str, Any]:
        """Validate and store feedback; returns the metric labels. Raises APIError (400/403/404)."""
        from fineray.train.pii import redact

        item = parse_feedback(body)
        stored = {"id": item.id, "rating": item.rating, "index": item.index,
                  "correction": None if item.correction is None else redact(item.correction)[0]}
        out = await self.handle.feedback.remote(stored, key_id)
        if "error" in out:
            status, message = out["error"]
            raise APIError(status, message, type="permission_error" if status == 403 else "invalid_request_error",
                           param="id", code="forbidden" if status == 403 else "response_not_found")
        return {**out, "rating": item.rating, "correction": item.correction is not None}
