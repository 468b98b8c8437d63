"""Mutation score of the invariants: single textual mutations at the rules that keep the data
right (admission, fencing, epoch gating, the leg-pricing rule, zero gamma), each applied to a
temporary copy of the tree, the tests that guard it run there, and the copy restored.

The working tree is never written: the copy lives in a temporary directory (removed on exit,
Ctrl-C included) and the tests import it first (PYTHONPATH and cwd), which the script checks
before it starts. A mutation whose tests still pass SURVIVED: it either gets a test, or it is
listed here with ``equivalent`` saying why no behaviour can tell it apart (those are not run
and not scored).

Run: ``.venv/bin/python bench/mutation.py [-k NAME ...] [--list] [--baseline]``.
Prints one line per mutation, then the score and the survivors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900.0  # a mutation that hangs the tests counts as killed


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str  # must occur exactly once in ``path``
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)
    equivalent: str = ""  # why no behaviour tells it apart (then it is not run)


T_NORM = ("tests/test_normalizer.py", "tests/test_lua.py")
T_HYD = ("tests/test_hydrator.py", "tests/test_lua.py")
T_TILE = ("tests/test_tile_builder.py",)
T_PUB = ("tests/test_publisher.py",)
T_LEASE = ("tests/test_lease.py", "tests/test_publisher.py", "tests/test_gex.py")
T_GEX = ("tests/test_gex.py",)
T_GEXM = ("tests/test_gex_math.py",)
T_VEC = ("tests/test_tile_vec.py", "tests/test_heatmap_math.py")
LUA = "processors/lua/"

MUTATIONS: tuple[Mutation, ...] = (
    # --- epochs: promotion, build, sweep, retire --------------------------------------------
    Mutation(
        "promote-without-watch",
        "processors/epochs/normalizer.py",
        "await pipe.watch(keys.epoch_active(sym))",
        "await pipe.watch(keys.epoch_index(sym))",
        T_NORM,
    ),
    Mutation(
        "build-into-any-state",
        LUA + "build.lua",
        "if redis.call('HGET', KEYS[1], 'state') ~= 'warming' then",
        "if redis.call('HGET', KEYS[1], 'state') == 'never' then",
        T_NORM,
    ),
    Mutation(
        "sweep-retires-the-active-epoch",
        "processors/epochs/normalizer.py",
        "if e == active or ttl >= 0:",
        "if ttl >= 0:",
        T_NORM,
    ),
    Mutation(
        "retire-extends-existing-ttls",
        LUA + "expire_keys.lua",
        "redis.call('EXPIRE', KEYS[i], ARGV[1], 'NX')",
        "redis.call('EXPIRE', KEYS[i], ARGV[1])",
        T_NORM,
    ),
    # --- admission of values into epochs ----------------------------------------------------
    Mutation(
        "hydrate-equal-ts-replaces",
        LUA + "hydrate.lua",
        "  return a > b\nend",
        "  return a >= b\nend",
        T_HYD,
    ),
    Mutation(
        "hydrate-ts-compared-without-length",
        LUA + "hydrate.lua",
        "  if #a ~= #b then return #a > #b end\n",
        "",
        T_HYD,
    ),
    Mutation(
        "hydrate-into-a-non-active-epoch",
        LUA + "hydrate.lua",
        "if redis.call('HGET', KEYS[1], 'state') ~= (ARGV[3] or 'active') then",
        "if redis.call('HGET', KEYS[1], 'state') == 'never' then",
        T_HYD,
    ),
    Mutation(
        "seed-older-quote-replaces",
        LUA + "seed.lua",
        "if qts ~= '' and ((not cur[2]) or newer(qts, cur[2])) then",
        "if qts ~= '' then",
        T_NORM,
    ),
    Mutation(
        "spot-without-admission",
        LUA + "spot.lua",
        "if (not cur) or newer(ts, cur) then",
        "if true then",
        T_NORM,
    ),
    Mutation(
        "gex-source-equal-ts-replaces",
        LUA + "gex_source.lua",
        "(#cur == #ARGV[1] and cur >= ARGV[1])",
        "(#cur == #ARGV[1] and cur > ARGV[1])",
        T_NORM,
    ),
    # --- heatmap staging ----------------------------------------------------------------------
    Mutation(
        "stage-equal-seq-admitted",
        LUA + "stage.lua",
        "      elseif seq > os then st = 1",
        "      elseif seq >= os then st = 1",
        T_TILE,
    ),
    Mutation(
        "stage-into-another-epoch",
        LUA + "stage.lua",
        "if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return -9 end",
        "",
        T_TILE,
    ),
    Mutation(
        "install-older-epoch-over-newer",
        LUA + "install.lua",
        "(#cc > #ARGV[2] or (#cc == #ARGV[2] and cc > ARGV[2]))",
        "(#cc > #ARGV[2] or (#cc == #ARGV[2] and cc < ARGV[2]))",
        T_TILE,
    ),
    Mutation(
        "optimistic-write-without-watch",
        "processors/heatmap/tile_builder.py",
        "await tx.watch(k_st, k_man)",
        "await tx.watch(k_man + ':unrelated')",
        T_TILE,
    ),
    # --- heatmap publisher and the fenced lease (processors/lease.py) ----------------------
    Mutation(
        "publish-without-version-check",
        LUA + "heatmap_publish.lua",
        "if tonumber(ARGV[4]) ~= tonumber(cur) + 1 then return {-4} end\n",
        "",
        T_PUB,
    ),
    Mutation(
        "publish-without-fence",
        LUA + "heatmap_publish.lua",
        "if fence ~= ARGV[1] then return {-1} end\n",
        "",
        T_PUB,
    ),
    Mutation(
        "publish-an-inactive-epoch",
        LUA + "heatmap_publish.lua",
        "if redis.call('GET', KEYS[3]) ~= ARGV[3] then return {-3} end\n",
        "",
        T_PUB,
    ),
    Mutation(
        "publish-without-chain-head",
        LUA + "heatmap_publish.lua",
        "if (redis.call('GET', KEYS[6]) or '') ~= ARGV[9] then return {-4} end\n",
        "",
        T_PUB,
    ),
    Mutation(
        "acquire-a-held-lease",
        LUA + "lease_acquire.lua",
        "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n",
        "",
        T_LEASE,
    ),
    Mutation(
        "renew-an-expired-lease-after-the-fence-moved",
        LUA + "lease_renew.lua",
        "if cur == false and redis.call('GET', KEYS[2]) == ARGV[3] then",
        "if cur == false then",
        T_LEASE,
    ),
    Mutation(
        "renew-another-owners-lease",
        LUA + "lease_renew.lua",
        "if cur == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end",
        "if cur then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end",
        T_LEASE,
    ),
    Mutation(
        "release-another-owners-lease",
        LUA + "lease_release.lua",
        "if redis.call('GET', KEYS[1]) == ARGV[1] then",
        "if true then",
        T_LEASE,
    ),
    # --- GEX publisher --------------------------------------------------------------------------
    Mutation(
        "gex-publish-without-fence",
        LUA + "gex_publish.lua",
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end\n",
        "",
        T_GEX,
    ),
    Mutation(
        "gex-publish-without-chain-head",
        LUA + "gex_publish.lua",
        "if (redis.call('GET', KEYS[7]) or '') ~= ARGV[8] then return 0 end\n",
        "",
        T_GEX,
    ),
    # --- GEX math -------------------------------------------------------------------------------
    Mutation(
        "zero-gamma-farthest-crossing",
        "processors/gex/exposure.py",
        "    _, lo, hi = min(cands)",
        "    _, lo, hi = max(cands)",
        T_GEXM,
    ),
    Mutation(
        "puts-counted-positive",
        "processors/gex/exposure.py",
        "    puts = -per_strike(shares, put)\n",
        "    puts = per_strike(shares, put)\n",
        T_GEXM,
    ),
    # --- the leg-pricing rule: reference and vectorised ------------------------------------
    Mutation(
        "vec-fresh-quote-strict",
        "processors/heatmap/tile_vec.py",
        "(as_of[:, None] - received <= max_age)",
        "(as_of[:, None] - received < max_age)",
        T_VEC,
    ),
    Mutation(
        "vec-stale-at-max-age",
        "processors/heatmap/tile_vec.py",
        "stale = priced & (as_of - info.min(axis=1) > max_age)",
        "stale = priced & (as_of - info.min(axis=1) >= max_age)",
        T_VEC,
    ),
    Mutation(
        "ref-fresh-quote-strict",
        "processors/heatmap/grid.py",
        "and as_of - rx <= max_age_ns:",
        "and as_of - rx < max_age_ns:",
        T_VEC,
    ),
    Mutation(
        "ref-equal-trade-beats-stale-quote",
        "processors/heatmap/grid.py",
        "if q.last is not None and (mid is None or tts > rx):",
        "if q.last is not None and (mid is None or tts >= rx):",
        T_VEC,
    ),
    Mutation(
        "ref-locked-market-untradable",
        "processors/heatmap/grid.py",
        "two = b is not None and a is not None and b > 0 and a >= b",
        "two = b is not None and a is not None and b > 0 and a > b",
        T_VEC,
    ),
)


def _copy_tree(dst: Path) -> None:
    """The tracked and untracked (not ignored) files of the working tree, as they are now."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    for rel in out.decode().split("\0"):
        if not rel:
            continue
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated module never leaves a stale .pyc
    return env


def _check_isolated(tree: Path) -> None:
    got = subprocess.run(
        [sys.executable, "-c", "import processors; print(processors.__file__)"],
        cwd=tree,
        env=_env(tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not got.startswith(str(tree)):
        raise SystemExit(f"mutation: tests would import {got}, not the copy in {tree}")


def _run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(passed, seconds, the end of pytest's output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly"]
    cmd += ["-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        run = subprocess.run(
            cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - t0, "timeout"
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
    return run.returncode == 0, time.monotonic() - t0, tail


def _mutate(tree: Path, m: Mutation) -> str:
    """Apply ``m`` in the copy; returns the original text (to restore)."""
    f = tree / m.path
    text = f.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: its text occurs {text.count(m.old)}x in {m.path}")
    f.write_text(text.replace(m.old, m.new), encoding="utf-8")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "-k", dest="only", action="append", default=[], help="mutations whose name has this"
    )
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first run each test set unmutated")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(k in m.name for k in args.only)]
    if args.list:
        for m in chosen:
            note = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{m.name:48s} {m.path}  {' '.join(m.tests)}{note}")
        return
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        _copy_tree(tree)
        _check_isolated(tree)
        for m in chosen:  # every mutation's text is still where it was written
            (tree / m.path).write_text(_mutate(tree, m), encoding="utf-8")
        if args.baseline:
            for tests in sorted({m.tests for m in chosen if not m.equivalent}):
                ok, secs, tail = _run_tests(tree, tests)
                print(f"baseline {'ok' if ok else 'FAILED'} {secs:6.1f}s  {' '.join(tests)}")
                if not ok:
                    print(tail)
                    raise SystemExit("mutation: the unmutated tests fail; fix them first")
        killed: list[str] = []
        survived: list[str] = []
        for m in chosen:
            if m.equivalent:
                print(f"{'equivalent':10s}        {m.name}: {m.equivalent}")
                continue
            original = _mutate(tree, m)
            try:
                passed, secs, _ = _run_tests(tree, m.tests)
            finally:
                (tree / m.path).write_text(original, encoding="utf-8")
            (survived if passed else killed).append(m.name)
            print(f"{'SURVIVED' if passed else 'killed':10s} {secs:6.1f}s {m.name}", flush=True)
        scored = len(killed) + len(survived)
        pct = 100.0 * len(killed) / scored if scored else 100.0
        n_eq = sum(1 for m in chosen if m.equivalent)
        print(f"score: {len(killed)}/{scored} killed ({pct:.0f}%), {n_eq} equivalent not scored")
        if survived:
            print("survivors: " + ", ".join(survived))
            raise SystemExit(1)


if __name__ == "__main__":
    main()
