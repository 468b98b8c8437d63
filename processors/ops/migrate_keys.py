"""``massive-pipeline migrate-keys``: move a single-node deployment's keys from the names
before the cluster key schema to the names of ``schemas/keys.py`` (every key of a symbol in
its ``{<SYM>}`` slot, per-symbol dirty, tile and diff streams).

Run it with every processor stopped (the old version writes the old names; the new one
reads only the new ones): stop the pipeline, run ``migrate-keys``, start the new version. It
refuses while a publisher or GEX lease of the old version is held (``--force`` overrides).
What moves, on one node (RENAME keeps a key's TTL, a stream's groups and pending lists):

* streams of the whole pipeline: ``massive:ws:stream``, ``massive:chain:stream``,
  ``massive:spot:stream``, ``massive:control:stream`` and their ``:dead`` streams: renamed;
* ``massive:contracts:dirty``, ``massive:tiles:<strategy>``, ``massive:heatmap:diffs:<strategy>``,
  ``massive:gex:diffs`` (and dead letters): split by the ``symbol`` of each entry into the
  symbol's stream, with the SAME entry ids (model checkpoints and chain heads name them);
  each consumer group is re-created on every symbol's stream just before its oldest pending
  entry (or at its last-delivered id), so nothing delivered but unacknowledged is lost: it
  is delivered again (every handler is idempotent), with ``ENTRIESREAD`` so the lag is known;
* ``massive:epoch:active`` (HASH) -> one ``massive:epoch:active:{<SYM>}`` per symbol;
  ``massive:epoch:index`` -> per symbol (the symbol from each epoch's meta); every key of
  each indexed or active epoch ``epoch:{<eid>}:...`` -> ``epoch:{<SYM>}:<eid>:...`` (its fixed
  keys and the contract hashes its ``contracts`` SET names);
* staging and manifest, model, version, head keys, GEX model / legacy maps / head / source /
  levels, chain band: renamed; a fence counter is copied to every symbol's fence (tokens
  only grow); old leases and build hashes are deleted (a new leader is elected).

Chain snapshot blobs keep their names (pointers name them; they expire within minutes).
Running it again does what is left (an old key that is gone is skipped). ``--dry-run``
prints the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas import keys
from streams import admin
from streams.logs import one_line
from streams.redis_client import CONNECT_ERRORS, admin_client, as_str, opt_str, unreachable
from streams.settings import RuntimeSettings, SettingsError, from_env

OLD_WS, OLD_CHAIN = "massive:ws:stream", "massive:chain:stream"
OLD_SPOT, OLD_CONTROL = "massive:spot:stream", "massive:control:stream"
OLD_DIRTY, OLD_GEX_DIFFS = "massive:contracts:dirty", "massive:gex:diffs"
OLD_ACTIVE, OLD_INDEX = "massive:epoch:active", "massive:epoch:index"
OLD_GEX_LEASE = "massive:gex:leader"
PAGE = 1000


def old_tiles(strategy: str) -> str:
    return f"massive:tiles:{strategy}"


def old_diffs(strategy: str) -> str:
    return f"massive:heatmap:diffs:{strategy}"


def old_publisher_lease(strategy: str) -> str:
    return f"massive:heatmap:leader:{strategy}"


def old_epoch_prefix(eid: str) -> str:
    return f"epoch:{{{eid}}}:"


class _Symbol(msgspec.Struct):
    symbol: str


_sym_decoder = msgspec.json.Decoder(_Symbol)


@dataclass
class Plan:
    """What was (or, dry, would be) done: one line per step."""

    dry_run: bool
    lines: list[str] = field(default_factory=list)
    moved_keys: int = 0
    copied_entries: int = 0
    kept_entries: int = 0  # undecodable entries left in an old stream

    def note(self, line: str) -> None:
        self.lines.append(line)


class Migration:
    def __init__(self, redis: Redis, symbols: Sequence[str], dry_run: bool) -> None:
        self.r = redis
        self.symbols = list(dict.fromkeys(symbols))
        self.plan = Plan(dry_run)

    # --- primitives ------------------------------------------------------------------------
    async def rename(self, old: str, new: str) -> bool:
        if not await self.r.exists(old):
            return False
        if await self.r.exists(new):
            raise RuntimeError(f"both {old} and {new} exist: resolve by hand, then run again")
        self.plan.note(f"RENAME {old} -> {new}")
        self.plan.moved_keys += 1
        if not self.plan.dry_run:
            await self.r.rename(old, new)
        return True

    async def split_stream(self, old: str, new_of: dict[str, str]) -> None:
        """Copy the entries of ``old`` to ``new_of[symbol of the entry]`` with their ids,
        re-create its groups there, and delete ``old`` (kept if an entry has no known
        symbol)."""
        if not await self.r.exists(old):
            return
        groups: list[Any] = await self.r.xinfo_groups(old)
        done = await self._copied_up_to(new_of.values())
        per: dict[str, int] = {}
        kept = 0
        start = "-"
        while True:
            batch: Any = await self.r.xrange(old, min=start, max="+", count=PAGE)
            if not batch:
                break
            kept += await self._copy_page(old, batch, new_of, done, per)
            start = "(" + as_str(batch[-1][0])
            if len(batch) < PAGE:
                break
        for sym, n in sorted(per.items()):
            self.plan.note(f"COPY {n} entries {old} -> {new_of[sym]}")
            self.plan.copied_entries += n
        for g in groups:
            await self._recreate_group(old, g, [new_of[s] for s in sorted(new_of)])
        if kept:
            self.plan.kept_entries += kept
            self.plan.note(f"KEEP {old}: {kept} entries without a configured symbol")
        else:
            self.plan.note(f"DEL {old}")
            if not self.plan.dry_run:
                await self.r.delete(old)

    async def _copied_up_to(self, streams: Iterable[str]) -> dict[str, tuple[int, int]]:
        """The last id of each target stream: a run that stopped half-way copied the entries
        up to it already, the copy goes on after them."""
        done: dict[str, tuple[int, int]] = {}
        for stream in streams:
            last: Any = await self.r.xrevrange(stream, count=1)
            done[stream] = _sid(last[0][0]) if last else (0, 0)
        return done

    async def _copy_page(
        self,
        old: str,
        batch: Any,
        new_of: dict[str, str],
        done: dict[str, tuple[int, int]],
        per: dict[str, int],
    ) -> int:
        """Copy one page of ``old`` (counted in ``per``) and drop the copies from ``old``;
        returns how many entries stay (no configured symbol)."""
        pipe = self.r.pipeline(transaction=False)
        moved: list[Any] = []
        kept = 0
        for eid, fields in batch:
            sym = _entry_symbol(fields)
            if sym is None or sym not in new_of:
                kept += 1
                continue
            moved.append(eid)
            if _sid(eid) <= done[new_of[sym]]:
                continue
            per[sym] = per.get(sym, 0) + 1
            pipe.xadd(new_of[sym], fields, id=eid)
        if not self.plan.dry_run:
            await pipe.execute()
            if moved:  # what is left in the old stream is what was not copied
                await self.r.xdel(old, *moved)
        return kept

    async def _recreate_group(self, old: str, g: dict[Any, Any], streams: list[str]) -> None:
        name = as_str(g["name"])
        at = as_str(g["last-delivered-id"])
        if int(g["pending"]):
            first: Any = await self.r.xpending(old, name)
            oldest = as_str(first["min"])
            ms, _, seq = oldest.partition("-")
            at = f"{ms}-{int(seq) - 1}" if int(seq or 0) else f"{int(ms) - 1}-18446744073709551615"
        for stream in streams:
            self.plan.note(f"GROUP {name} on {stream} at {at}")
            if self.plan.dry_run:
                continue
            after = await admin.count_after(self.r, stream, at)
            read = int(await self.r.xlen(stream)) - after
            try:
                await self.r.xgroup_create(stream, name, id=at, mkstream=True, entries_read=read)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # created by an earlier run: keep it
                    raise

    # --- the steps -------------------------------------------------------------------------
    async def leases_held(self) -> list[str]:
        names = [old_publisher_lease(s) for s in keys.STRATEGIES] + [OLD_GEX_LEASE]
        return [n for n in names if await self.r.exists(n)]

    async def run(self) -> Plan:
        for old, new in (
            (OLD_WS, keys.WS_STREAM),
            (OLD_CHAIN, keys.CHAIN_STREAM),
            (OLD_SPOT, keys.SPOT_STREAM),
            (OLD_CONTROL, keys.CONTROL_STREAM),
        ):
            await self.rename(old, new)
            await self.rename(f"{old}:dead", keys.dead_letter_stream(new))
        await self.epochs()
        by_sym = {s: s for s in self.symbols}
        splits = [(OLD_DIRTY, keys.contracts_dirty_stream), (OLD_GEX_DIFFS, keys.gex_diffs_stream)]
        for old, per_symbol in splits:
            await self.split_stream(old, {s: per_symbol(s) for s in by_sym})
            dead = {s: keys.dead_letter_stream(per_symbol(s)) for s in by_sym}
            await self.split_stream(f"{old}:dead", dead)
        for st in keys.STRATEGIES:
            for old, fn in (
                (old_tiles(st), keys.tiles_stream),
                (old_diffs(st), keys.heatmap_diffs_stream),
            ):
                await self.split_stream(old, {s: fn(st, s) for s in by_sym})
                dead = {s: keys.dead_letter_stream(fn(st, s)) for s in by_sym}
                await self.split_stream(f"{old}:dead", dead)
        for sym in self.symbols:
            await self.symbol_keys(sym)
        await self.leases_and_fences()
        return self.plan

    async def epochs(self) -> None:
        active = {as_str(k): as_str(v) for k, v in (await self.r.hgetall(OLD_ACTIVE)).items()}
        index: Any = await self.r.zrange(OLD_INDEX, 0, -1, withscores=True)
        eids = dict.fromkeys([as_str(e) for e, _ in index] + list(active.values()))
        scores = {as_str(e): s for e, s in index}
        for eid in eids:
            sym = opt_str(await self.r.hget(old_epoch_prefix(eid) + "meta", "symbol"))
            sym = sym or next((s for s, e in active.items() if e == eid), None)
            if sym is None:
                self.plan.note(f"SKIP epoch {eid}: no meta (expired)")
                continue
            await self._move_epoch(sym, eid, scores.get(eid))
        for sym, eid in sorted(active.items()):
            self.plan.note(f"SET {keys.epoch_active(sym)} {eid}")
            if not self.plan.dry_run:
                await self.r.set(keys.epoch_active(sym), eid)
        for old in (OLD_ACTIVE, OLD_INDEX):
            if await self.r.exists(old):
                self.plan.note(f"DEL {old}")
                if not self.plan.dry_run:
                    await self.r.delete(old)

    async def _move_epoch(self, sym: str, eid: str, score: float | None) -> None:
        """Every key of epoch ``eid`` (its fixed keys, the contract hashes its SET names) to
        the symbol's names, and its index entry."""
        old_p, new_p = old_epoch_prefix(eid), keys.epoch_key_prefix(sym, eid)
        cids = [as_str(c) for c in await self.r.smembers(old_p + "contracts")]
        names = ["meta", "contracts", "by_strike", "by_expiry", "gex"]
        names += [f"contract:{c}" for c in sorted(cids)]
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.exists(old_p + n)
        present = [n for n, e in zip(names, await pipe.execute(), strict=True) if e]
        self.plan.note(f"RENAME {len(present)} keys {old_p}* -> {new_p}*")
        self.plan.moved_keys += len(present)
        if self.plan.dry_run:
            return
        pipe = self.r.pipeline(transaction=False)
        for n in present:
            pipe.rename(old_p + n, new_p + n)
        for res in await pipe.execute(raise_on_error=False):
            # a retired epoch's key may expire between EXISTS and RENAME
            if isinstance(res, Exception) and "no such key" not in str(res):
                raise res
        if score is not None:
            await self.r.zadd(keys.epoch_index(sym), {eid: score})

    async def symbol_keys(self, sym: str) -> None:
        pairs = [
            (f"massive:gex:model:{sym}", keys.gex_model(sym)),
            (f"massive:gex:model:{sym}:calls", keys.gex_model_calls(sym)),
            (f"massive:gex:model:{sym}:puts", keys.gex_model_puts(sym)),
            (f"massive:gex:head:{sym}", keys.gex_head(sym)),
            (f"massive:gex:source:{sym}", keys.gex_source(sym)),
            (f"massive:gex:levels:{sym}", keys.gex_levels_stream(sym)),
            (f"massive:chain:band:{sym}", keys.chain_band(sym)),
        ]
        for st in keys.STRATEGIES:
            pairs += [
                (f"heatmap:{{{sym}:{st}}}:staging", keys.heatmap_staging(sym, st)),
                (f"heatmap:{{{sym}:{st}}}:manifest", keys.heatmap_manifest(sym, st)),
                (f"massive:heatmap:model:{sym}:{st}", keys.heatmap_model(sym, st)),
                (f"massive:heatmap:version:{sym}:{st}", keys.heatmap_version(sym, st)),
                (f"massive:heatmap:head:{sym}:{st}", keys.heatmap_head(sym, st)),
            ]
        for old, new in pairs:
            await self.rename(old, new)

    async def leases_and_fences(self) -> None:
        fences = [(f"{OLD_GEX_LEASE}:fence", [keys.gex_fence(s) for s in self.symbols])]
        for st in keys.STRATEGIES:
            fences.append(
                (
                    f"{old_publisher_lease(st)}:fence",
                    [keys.publisher_fence(s, st) for s in self.symbols],
                )
            )
        for old, news in fences:
            value = await self.r.get(old)
            if value is None:
                continue
            for fence in news:
                self.plan.note(f"COPY fence {old} ({as_str(value)}) -> {fence}")
                if not self.plan.dry_run:
                    cur = await self.r.get(fence)
                    if cur is None or int(cur) < int(value):
                        await self.r.set(fence, value)
            if not self.plan.dry_run:
                await self.r.delete(old)
        stale = await self.leases_held()
        stale += [as_str(k) async for k in self.r.scan_iter(match="heatmap:{*}:build:*")]
        for k in stale:
            self.plan.note(f"DEL {k}")
            if not self.plan.dry_run:
                await self.r.delete(k)


def _sid(v: Any) -> tuple[int, int]:
    ms, _, seq = as_str(v).partition("-")
    return int(ms), int(seq or 0)


def _entry_symbol(fields: dict[bytes, bytes]) -> str | None:
    raw = fields.get(b"d")
    if raw is None:
        return None
    try:
        return _sym_decoder.decode(raw).symbol
    except msgspec.DecodeError:
        return None


async def migrate(
    redis: Redis, symbols: Sequence[str], *, dry_run: bool = False, force: bool = False
) -> Plan:
    m = Migration(redis, symbols, dry_run)
    held = await m.leases_held()
    if held and not force and not dry_run:
        raise RuntimeError(
            "the old version still runs (lease held: " + ", ".join(held) + "); stop every "
            "processor first (or --force)"
        )
    return await m.run()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="massive-pipeline migrate-keys", description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--force", action="store_true", help="run although an old lease is held")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = from_env(RuntimeSettings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2

    async def go() -> Plan:
        r = admin_client(settings.redis_url)
        try:
            return await migrate(r, settings.symbols, dry_run=args.dry_run, force=args.force)
        finally:
            await r.aclose()

    try:
        plan = asyncio.run(go())
    except CONNECT_ERRORS as exc:
        print(unreachable(settings.redis_url, exc), file=sys.stderr)
        return 2
    except Exception as exc:  # a refusal or a Redis error reply: one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    print("\n".join(plan.lines) or "nothing to migrate")
    print(
        f"{'would move' if plan.dry_run else 'moved'} {plan.moved_keys} keys, "
        f"{plan.copied_entries} stream entries; {plan.kept_entries} entries kept"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
