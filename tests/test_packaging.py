"""Dependencies: bounded in pyproject.toml, pinned with hashes in the locks `make` installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
DEV = [Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def pins(lock: str) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes)."""
    out: dict[str, tuple[Version, int]] = {}
    name = ""
    for line in (ROOT / lock).read_text().splitlines():
        m = PIN.match(line)
        if m:
            name = canonicalize_name(m.group(1))
            out[name] = (Version(m.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, n = out[name]
            out[name] = (version, n + 1)
    return out


def test_every_dependency_has_an_upper_bound() -> None:
    unbounded = [str(r) for r in RUNTIME + DEV if not any(s.operator == "<" for s in r.specifier)]
    assert unbounded == []


def test_the_locks_pin_every_dependency_within_its_bounds_with_hashes() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    for lock, reqs in ((runtime, RUNTIME), (dev, RUNTIME + DEV)):
        for r in reqs:
            version, _ = lock[canonicalize_name(r.name)]
            assert r.specifier.contains(version), (r, version, "run `make lock`")
        assert all(n >= 1 for _, n in lock.values())
    # the dev lock was resolved with the runtime lock as constraints: one version of each
    assert {n: v for n, (v, _) in dev.items() if n in runtime} == {
        n: v for n, (v, _) in runtime.items()
    }


def test_make_installs_the_dev_lock_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "DEV_LOCK := requirements-dev.lock" in makefile
    assert "pip install -q --require-hashes -r $(DEV_LOCK)" in makefile
    assert "pip install -q --no-deps -e ." in makefile
