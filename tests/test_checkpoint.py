"""The piecewise checkpoint reader (processors/heatmap/checkpoint.py ``spool``) against a real
Redis: a marked checkpoint is copied a chunk at a time and read back a piece at a time, a copy
that sees the checkpoint replaced starts again, anything else is read whole."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from processors.heatmap import checkpoint
from schemas.messages import PublishedModel, encode_model_pieces

KEY = "test:model:{SPX}"


def model(n: int, version: int = 3, diff_id: str | None = "5-0") -> PublishedModel:
    items = {f"SPX:2026-12-18:C:{i}": {"v": i, "s": "x\ty\n"} for i in range(n)}
    return PublishedModel("SPX", "heatmap:single", "e1", version, 77, items, {"n": n}, diff_id)


def marked(m: PublishedModel, per_piece: int) -> bytes:
    return b"".join(encode_model_pieces(m, per_piece, marked=True))


def read_back(sp: checkpoint.Spooled) -> dict[str, Any]:
    items: dict[str, Any] = {}
    for piece in sp.item_pieces(read_bytes=100):  # pieces cut across reads
        items.update(msgspec.json.decode(piece))
    return items


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(0, 60), per_piece=st.integers(1, 25), chunk=st.integers(64, 2000))
async def test_a_marked_checkpoint_is_copied_and_read_back_piece_by_piece(
    redis: Redis, tmp_path: Path, n: int, per_piece: int, chunk: int
) -> None:
    m = model(n)
    body = marked(m, per_piece)
    await redis.set(KEY, body)
    sp = await checkpoint.spool(redis, KEY, chunk_bytes=chunk, spool_dir=str(tmp_path))
    assert isinstance(sp, checkpoint.Spooled)
    assert (sp.head.symbol, sp.head.epoch, sp.head.version, sp.head.ts_ns) == ("SPX", "e1", 3, 77)
    assert (sp.tail.meta, sp.tail.diff_id) == ({"n": n}, "5-0")
    assert read_back(sp) == msgspec.json.decode(msgspec.json.encode(m.items))
    assert b"".join(sp.slices(333)) == body
    assert os.listdir(tmp_path) == []  # unnamed: nothing to clean up after a crash
    sp.close()


async def test_a_copy_that_sees_a_new_checkpoint_starts_again(redis: Redis) -> None:
    """The checkpoint is replaced after the copy's second chunk (the publisher renames a new
    one in): the copy starts over and returns the new one, never a mix of the two; a key
    replaced during every copy gives CheckpointMoving."""
    old, new = marked(model(200, version=3), 4), marked(model(201, version=4), 4)
    await redis.set(KEY, old)
    entered = 0

    class Replacing(asyncio.Semaphore):
        def __init__(self, every: int | None) -> None:
            super().__init__(1)
            self.every = every

        async def __aenter__(self) -> None:
            nonlocal entered
            entered += 1
            if entered == 3 or (self.every is not None and entered % self.every == 0):
                await redis.set(KEY, new if entered % 2 else old)
            await super().__aenter__()

    sp = await checkpoint.spool(redis, KEY, chunk_bytes=256, slots=Replacing(None))
    assert isinstance(sp, checkpoint.Spooled)
    assert sp.head.version == 4 and b"".join(sp.slices(1000)) == new
    assert entered > -(-(len(new) - checkpoint.HEAD_BYTES) // 256) + 2  # it started again
    entered = 0
    with pytest.raises(checkpoint.CheckpointMoving):
        await checkpoint.spool(redis, KEY, chunk_bytes=256, slots=Replacing(3), attempts=3)


async def test_anything_but_a_marked_checkpoint_is_read_whole(redis: Redis) -> None:
    assert await checkpoint.spool(redis, KEY) is None
    plain = msgspec.json.encode(model(30))  # a GEX model, or one from before the marks
    await redis.set(KEY, plain)
    assert await checkpoint.spool(redis, KEY, chunk_bytes=100) == plain
    odd = b'{"not":"a model"}\t' + b"x" * 500  # a tab, but no model around it
    await redis.set(KEY, odd)
    assert await checkpoint.spool(redis, KEY, chunk_bytes=100) == odd


def test_an_overlay_keeps_the_latest_value_of_each_key_on_disk(tmp_path: Path) -> None:
    over = checkpoint.Overlay(str(tmp_path))
    over.set("a", msgspec.Raw(b'{"v":1}'))
    over.set("b", msgspec.Raw(b'{"v":"two"}'))
    over.set("a", msgspec.Raw(b'{"v":3}'))  # changed again
    over.remove("b")
    over.remove("c")  # removed without a value: still a key the diffs touched
    over.set("c", msgspec.Raw(b"[4]"))  # removed, then added again
    over.done()
    got = {k: None if v is None else bytes(v) for k, v in over.items()}
    assert got == {"a": b'{"v":3}', "b": None, "c": b"[4]"}
    assert len(over) == 3 and over.value(1) is None and bytes(over.value(2) or b"") == b"[4]"
    assert [over.index(k) for k in "abcz"] == [0, 1, 2, None] and over.key(2) == "c"
    assert over.size == len(b'{"v":1}{"v":"two"}{"v":3}[4]')  # every value written, in order
    assert os.listdir(tmp_path) == []
    over.close()
