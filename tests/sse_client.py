"""A Python reader of the gateway's SSE wire format, as a browser page uses it: it keeps
the model of one (channel, symbol), applies diffs, checks the diff chain and reconnects with
``Last-Event-ID`` when the stream ends. Tests compare its model with ``/api``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import orjson


class ModelClient:
    """``channel``: ``heatmap/<strategy>`` or ``gex``."""

    def __init__(self, base_url: str, channel: str, symbol: str, history_max: int = 0) -> None:
        self.url = f"{base_url}/sse/{channel}?symbol={symbol}"
        self.channel = channel
        self.model: dict[str, Any] | None = None
        self.head: str | None = None  # id of the diff (or snapshot) the model is at
        self.last_event_id: str | None = None
        self.snapshots = 0
        self.diffs = 0
        self.chain_breaks = 0  # diffs that did not continue the model: a gateway bug
        self.version_at_mark = 0
        # version -> fingerprint of the items at that version (XOR of per-item hashes,
        # updated per diff), so a checker can compare any recent version with /api
        self.history: dict[int, int] = {}
        self.history_max = history_max
        self._fp = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        return int(self.model["version"]) if self.model is not None else 0

    def mark(self) -> None:
        self.version_at_mark = self.version

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sse-client:{self.channel}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
            try:
                async with (
                    httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as c,
                    c.stream("GET", self.url, headers=headers) as resp,
                ):
                    buf = b""
                    async for chunk in resp.aiter_bytes():
                        buf += chunk.replace(b"\r\n", b"\n")
                        while b"\n\n" in buf:
                            raw, buf = buf.split(b"\n\n", 1)
                            self._on_frame(raw)
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(0.2)  # a browser's EventSource retry

    def _on_frame(self, raw: bytes) -> None:
        event, data, eid = "message", b"", None
        for line in raw.split(b"\n"):
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"id: "):
                eid = line[4:].decode()
        if eid:
            self.last_event_id = eid
        if event == "snapshot":
            self.model = orjson.loads(data)
            self.head = self.model.get("diff_id") if self.model else None
            self.snapshots += 1
            if self.history_max and self.model is not None:
                self._fp = fingerprint(self.model["items"])
                self._remember()
        elif event == "diff" and self.model is not None:
            d = orjson.loads(data)
            prev_id = d.get("prev_id")
            if (
                d["epoch"] != self.model["epoch"]
                or d["prev_version"] != self.model["version"]
                or (prev_id is not None and self.head is not None and prev_id != self.head)
            ):
                self.chain_breaks += 1
                return
            items = self.model["items"]
            if self.history_max:
                for k, v in d["changed"].items():
                    if k in items:
                        self._fp ^= item_hash(k, items[k])
                    self._fp ^= item_hash(k, v)
                for k in d.get("removed", ()):
                    if k in items:
                        self._fp ^= item_hash(k, items[k])
            items.update(d["changed"])
            for k in d.get("removed", ()):
                items.pop(k, None)
            self.model["version"] = d["version"]
            self.model["meta"] = d.get("meta", self.model.get("meta"))
            self.head = eid
            self.diffs += 1
            if self.history_max:
                self._remember()

    def _remember(self) -> None:
        self.history[self.version] = self._fp
        if len(self.history) > self.history_max:
            del self.history[min(self.history)]


def item_hash(key: str, value: Any) -> int:
    return hash((key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))


def fingerprint(items: dict[str, Any]) -> int:
    """Order-free fingerprint of a model's items (what ModelClient.history holds)."""
    fp = 0
    for k, v in items.items():
        fp ^= item_hash(k, v)
    return fp
