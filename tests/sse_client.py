"""A Python reader of the gateway's SSE wire formats (whole models: the published JSON;
views: compact, processors/serve/views.py), as the browser page uses them: it keeps the model
of one stream, applies diffs, checks the diff chain and reconnects with ``Last-Event-ID``
when the stream ends. Tests compare its model (items keyed by tile id, in their published
JSON form) with ``/api``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import httpx
import msgspec
import orjson


def full_key(kt: list[str | None] | None, key: str) -> str:
    """A compact key -> the item's id (the key template ``kt`` of the snapshot)."""
    if kt is None:
        return key
    if key.startswith("="):
        return key[1:]
    parts = iter(key.split(":"))
    return ":".join(p if p is not None else next(parts) for p in kt)


def set_field(item: dict[str, Any], name: str, v: Any) -> None:
    """``name`` = a key, or ``key.i.j``: element j of the i-th array of ``item[key]``."""
    k, dot, rest = name.partition(".")
    if not dot:
        item[k] = v
        return
    i_s, _, j_s = rest.partition(".")
    i, j = int(i_s), int(j_s)
    arr = item.setdefault(k, [])
    while len(arr) <= i:
        arr.append([])
    while len(arr[i]) <= j:
        arr[i].append(None)
    arr[i][j] = v


def continues(
    model: dict[str, Any], head: str | None, epoch: str, prev_version: int, prev_id: str | None
) -> bool:
    """Whether a diff (its epoch, prev_version, prev_id) continues ``model`` held at ``head``."""
    return (
        epoch == model["epoch"]
        and prev_version == model["version"]
        and (prev_id is None or head is None or prev_id == head)
    )


class ChainBreak(Exception):
    """A diff that does not continue the model held (a gateway bug)."""


def _check_chain(m: dict[str, Any], head: str | None, d: dict[str, Any]) -> None:
    """Raises ChainBreak unless diff ``d`` continues model ``m`` (at diff ``head``)."""
    if d.get("snapshot"):
        raise ChainBreak(f"a snapshot version's diff (its items are in the model key): {d}")
    if not continues(m, head, d["epoch"], d["prev_version"], d.get("prev_id")):
        raise ChainBreak(f"have {m['epoch']}/v{m['version']}@{head}, got {d}")


class ViewReader:
    """The model of one view from its ``snapshot`` and ``diff`` events."""

    def __init__(self) -> None:
        self.model: dict[str, Any] | None = None
        self.kt: list[str | None] | None = None
        self.head: str | None = None  # id of the diff (or snapshot) the model is at

    def snapshot(self, data: bytes | str) -> dict[str, Any]:
        s = orjson.loads(data)
        if "items" in s:  # a whole-model stream: the published model as stored
            self.model, self.kt, self.head = s, None, s.get("diff_id")
            return s
        self.kt = s.get("kt")
        names = s["f"]
        items: dict[str, Any] = {}
        for row in s["d"]:
            item: dict[str, Any] = {}
            for name, v in zip(names, row[1:], strict=True):
                set_field(item, name, v)
            items[full_key(self.kt, row[0])] = item
        for k, v in s.get("o", {}).items():
            items[full_key(self.kt, k)] = v
        self.model = {
            k: s.get(k) for k in ("symbol", "kind", "epoch", "version", "ts_ns", "meta", "diff_id")
        }
        self.model["items"] = items
        self.model["view"] = s.get("view", {})
        self.model["expiries"] = s.get("expiries", [])
        self.head = s.get("diff_id")
        return self.model

    def diff(self, data: bytes | str, event_id: str | None) -> tuple[dict[str, Any], list[str]]:
        """Apply one diff; returns (the diff as sent, ids of the changed items). Raises
        ChainBreak when it does not continue the model (nothing is applied then)."""
        m = self.model
        if m is None:
            raise ChainBreak("diff before any snapshot")
        d = orjson.loads(data)
        _check_chain(m, self.head, d)
        items = m["items"]
        touched: list[str] = []
        if "changed" in d:  # a whole-model stream: the ModelDiff as published
            items.update(d["changed"])
            for k in d.get("removed", ()):
                items.pop(k, None)
            m["version"], m["ts_ns"], m["meta"] = d["version"], d["ts_ns"], d.get("meta", {})
            self.head = event_id
            return d, [*d["changed"], *d.get("removed", ())]
        for g in d.get("c", ()):
            names, whole = g["f"], g.get("n") == 1
            for row in g["d"]:
                key = full_key(self.kt, row[0])
                item = {} if whole else items.get(key)
                if item is None:
                    raise ChainBreak(f"fields of an unknown item {key}")
                for name, v in zip(names, row[1:], strict=True):
                    set_field(item, name, v)
                items[key] = item
                touched.append(key)
        for k, v in d.get("o", {}).items():
            items[full_key(self.kt, k)] = v
            touched.append(full_key(self.kt, k))
        removed = [full_key(self.kt, k) for k in d.get("r", ())]
        for k in removed:
            items.pop(k, None)
        m["version"], m["ts_ns"] = d["version"], d["ts_ns"]
        if "meta" in d:
            m["meta"] = d["meta"]
        self.head = event_id
        return d, touched + removed


class ModelClient:
    """``channel``: ``heatmap/<strategy>`` or ``gex``; ``view``: extra query (``&expiry=..``).

    ``raw`` (a whole-model stream with a history, the soak's checker): the items are not
    decoded or kept, only a hash of each one's JSON as published, compared with
    :func:`raw_fingerprint` of ``/api``. Decoding and re-encoding every changed item was
    most of a checker's CPU: it fell behind ~1 MB diffs and measured its own backlog."""

    def __init__(
        self,
        base_url: str,
        channel: str,
        symbol: str,
        history_max: int = 0,
        view: str = "",
        raw: bool = False,
    ) -> None:
        if raw and (view or not history_max):
            raise ValueError("raw: a whole-model stream with a history only")
        self.raw = raw
        self.url = f"{base_url}/sse/{channel}?symbol={symbol}{view}"
        self.reader = ViewReader()
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
        self._hashes: dict[str, int] = {}  # item -> item_hash (history_max only)
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
                    buf = bytearray()
                    async for chunk in resp.aiter_bytes():
                        start = max(0, len(buf) - 3)  # a separator may span two chunks
                        buf += chunk
                        end = buf.find(b"\r\n\r\n", start)
                        while end >= 0:
                            self._on_frame(bytes(buf[:end]).replace(b"\r\n", b"\n"))
                            del buf[: end + 4]
                            end = buf.find(b"\r\n\r\n")
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(0.2)  # a browser's EventSource retry

    def _on_frame(self, raw: bytes) -> None:
        event, data, eid = _parse_event(raw)
        if eid:
            self.last_event_id = eid
        if event == "snapshot":
            self._on_snapshot(data)
        elif event == "diff" and self.model is not None:
            self._on_diff(data, eid)

    def _on_snapshot(self, data: bytes) -> None:
        if self.raw:
            self._on_raw_snapshot(data)
            return
        self.model = self.reader.snapshot(data)
        self.head = self.reader.head
        self.snapshots += 1
        if self.history_max:
            self._hashes = {k: item_hash(k, v) for k, v in self.model["items"].items()}
            self._fp = xor_all(self._hashes.values())
            self._remember()

    def _on_diff(self, data: bytes, eid: str | None) -> None:
        if self.raw:
            self._on_raw_diff(data, eid)
            return
        try:
            _, touched = self.reader.diff(data, eid)
        except ChainBreak:
            self.chain_breaks += 1
            return
        if self.history_max:
            # the hash of each touched item is kept, not recomputed from the old value:
            # hashing is most of this client's work, and a client that falls behind
            # measures itself rather than the gateway
            assert self.model is not None
            items = self.model["items"]
            for k in set(touched):
                self._rehash(k, item_hash(k, items[k]) if k in items else None)
            self._remember()
        self.head = eid
        self.diffs += 1

    # -- a whole-model stream with a history: the items' published JSON, hashed as sent --
    def _on_raw_snapshot(self, data: bytes) -> None:
        s = _raw_snapshot.decode(data)
        self.model = {"epoch": s.epoch, "version": s.version, "ts_ns": s.ts_ns, "items": {}}
        self.head = s.diff_id
        self.snapshots += 1
        self._hashes = {k: raw_item_hash(k, v) for k, v in s.items.items()}
        self._fp = xor_all(self._hashes.values())
        self._remember()

    def _on_raw_diff(self, data: bytes, eid: str | None) -> None:
        m = self.model
        assert m is not None
        d = _raw_diff.decode(data)
        if not continues(m, self.head, d.epoch, d.prev_version, d.prev_id):
            self.chain_breaks += 1
            return
        for k in d.removed:
            self._rehash(k, None)
        for k, v in d.changed.items():
            self._rehash(k, raw_item_hash(k, v))
        m["version"], m["ts_ns"] = d.version, d.ts_ns
        self._remember()
        self.head = eid
        self.diffs += 1

    def _rehash(self, key: str, h: int | None) -> None:
        """Item ``key`` now hashes to ``h`` (None: removed); the fingerprint follows."""
        old = self._hashes.pop(key, None)
        if old is not None:
            self._fp ^= old
        if h is not None:
            self._hashes[key] = h
            self._fp ^= h

    def _remember(self) -> None:
        self.history[self.version] = self._fp
        if len(self.history) > self.history_max:
            del self.history[min(self.history)]


def _parse_event(raw: bytes) -> tuple[str, bytes, str | None]:
    """(event, data, id) of one SSE event (LF line ends)."""
    event, data, eid = "message", b"", None
    for line in raw.split(b"\n"):
        if line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
        elif line.startswith(b"id: "):
            eid = line[4:].decode()
    return event, data, eid


def item_hash(key: str, value: Any) -> int:
    return hash((key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))


class _RawSnapshot(msgspec.Struct):
    """A whole-model snapshot (the published model as stored), items as raw JSON."""

    epoch: str
    version: int
    items: dict[str, msgspec.Raw]
    ts_ns: int = 0
    diff_id: str | None = None


class _RawDiff(msgspec.Struct):
    """A whole-model diff (the ModelDiff as published), items as raw JSON."""

    epoch: str
    version: int
    prev_version: int
    ts_ns: int
    changed: dict[str, msgspec.Raw] = {}
    removed: list[str] = []
    prev_id: str | None = None


_raw_snapshot = msgspec.json.Decoder(_RawSnapshot)
_raw_diff = msgspec.json.Decoder(_RawDiff)


def raw_fingerprint(model_json: bytes) -> tuple[int, int]:
    """(version, fingerprint) of a whole published model (``/api`` without filters), as a
    ``raw`` ModelClient's history holds it: the items' JSON compared byte for byte."""
    s = _raw_snapshot.decode(model_json)
    return s.version, xor_all(raw_item_hash(k, v) for k, v in s.items.items())


def raw_item_hash(key: str, raw: msgspec.Raw) -> int:
    return hash((key, bytes(raw)))


def xor_all(hashes: Iterable[int]) -> int:
    fp = 0
    for h in hashes:
        fp ^= h
    return fp


def fingerprint(items: dict[str, Any]) -> int:
    """Order-free fingerprint of a model's items (what ModelClient.history holds)."""
    return xor_all(item_hash(k, v) for k, v in items.items())


class Dechunk:
    """The body of a chunked HTTP/1.1 response read from a raw socket (``+=`` raw bytes)."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.body = bytearray()
        self.headers_done = False

    def __iadd__(self, chunk: bytes) -> Dechunk:
        self.raw += chunk
        if not self.headers_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return self
            del self.raw[: end + 4]
            self.headers_done = True
        while True:
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                return self
            size = int(bytes(self.raw[:eol]), 16)
            if len(self.raw) < eol + 2 + size + 2:
                return self
            self.body += self.raw[eol + 2 : eol + 2 + size]
            del self.raw[: eol + 2 + size + 2]

    def frames(self) -> list[tuple[str, str, bytes]]:
        """Pop the complete SSE events of the body as (event, id, data); comments skipped."""
        out: list[tuple[str, str, bytes]] = []
        buf = self.body
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            block = bytes(buf[:end])
            del buf[: end + 4]
            ev, eid, data = "", "", b""
            for line in block.split(b"\r\n"):
                if line.startswith(b"event: "):
                    ev = line[7:].decode()
                elif line.startswith(b"id: "):
                    eid = line[4:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
            if ev:
                out.append((ev, eid, data))
