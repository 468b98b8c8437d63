"""Settings from the environment: typed by msgspec, unknown MASSIVE_* names refused."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from processors import registry
from processors.ingest import chain_poller, ws_ingest
from processors.ops import cli
from streams.settings import (
    RuntimeSettings,
    SettingsError,
    check_env,
    env_names,
    env_settings,
    fallback_env,
    from_env,
    registered,
)

ROOT = Path(__file__).resolve().parent.parent


@env_settings("MASSIVE_EXAMPLE_")
@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    n: int = 1
    ratio: float = 0.5
    on: bool = True
    widths: tuple[float, ...] = (5.0,)
    name: str = "x"
    key: str = fallback_env("MASSIVE_EXAMPLE_SHARED_KEY", "")

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_strings_are_typed_by_field() -> None:
    env = {
        "MASSIVE_EXAMPLE_N": "7",
        "MASSIVE_EXAMPLE_RATIO": "0.25",
        "MASSIVE_EXAMPLE_ON": "false",
        "MASSIVE_EXAMPLE_WIDTHS": "5, 10,12.5",
        "MASSIVE_EXAMPLE_NAME": "y",
        "OTHER": "ignored",
    }
    assert from_env(Example, env) == Example(7, 0.25, False, (5.0, 10.0, 12.5), "y")
    assert from_env(Example, {}) == Example()
    assert from_env(Example, {"MASSIVE_EXAMPLE_WIDTHS": ""}).widths == ()


def test_a_field_falls_back_to_its_shared_variable_and_its_own_wins() -> None:
    shared = {"MASSIVE_EXAMPLE_SHARED_KEY": "shared"}
    assert from_env(Example, shared).key == "shared"
    assert from_env(Example, {**shared, "MASSIVE_EXAMPLE_KEY": "own"}).key == "own"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MASSIVE_EXAMPLE_N": "five"}, "MASSIVE_EXAMPLE_N='five': Expected `int`"),
        ({"MASSIVE_EXAMPLE_ON": "maybe"}, "MASSIVE_EXAMPLE_ON='maybe': Expected `bool`"),
        ({"MASSIVE_EXAMPLE_WIDTHS": "5,x"}, "MASSIVE_EXAMPLE_WIDTHS='5,x': Expected `float`"),
        ({"MASSIVE_EXAMPLE_N": "-1"}, "Example (MASSIVE_EXAMPLE_*): n must be >= 0"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as ei:
        from_env(Example, env)
    assert str(ei.value).startswith(message)


def test_an_unregistered_class_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Loose:
        n: int = 1

    with pytest.raises(TypeError, match="env_settings"):
        from_env(Loose, {})
    with pytest.raises(TypeError, match="pass no prefix"):
        from_env(Example, "MASSIVE_EXAMPLE_")  # type: ignore[arg-type]


def test_an_unknown_name_is_refused_with_the_closest_known_one() -> None:
    with pytest.raises(SettingsError, match=r"^unknown setting MASSIVE_CUONT; did you mean "):
        check_env({"MASSIVE_CUONT": "5"})
    with pytest.raises(SettingsError) as ei:
        check_env({"MASSIVE_CUONT": "5"})
    assert str(ei.value) == "unknown setting MASSIVE_CUONT; did you mean MASSIVE_COUNT?"
    with pytest.raises(SettingsError, match="did you mean MASSIVE_POLLER_REST_URL"):
        check_env({"MASSIVE_POLLER_RESTURL": "x"})
    with pytest.raises(SettingsError, match=r"^unknown setting MASSIVE_ZZZZZZZZZZZZZZZZZZZ$"):
        check_env({"MASSIVE_ZZZZZZZZZZZZZZZZZZZ": "1"})
    check_env({"MASSIVE_COUNT": "5", "MASSIVE_API_KEY": "k", "MASSIVE_WS_URL": "ws://h", "X": ""})


def test_every_stage_class_is_registered_with_unique_names_and_valid_defaults() -> None:
    assert registry.PROCESSORS  # importing the registry imported every stage
    classes = [c for c in registered() if c is not Example]
    assert {RuntimeSettings, chain_poller.PollerSettings, ws_ingest.WsSettings} <= set(classes)
    own = Counter(n for c in classes for n, f in env_names(c).items() if not _fallback(c, n))
    assert [n for n, k in own.items() if k > 1] == []
    for cls in classes:
        from_env(cls, {})  # the defaults pass every rule


def _fallback(cls: type, name: str) -> bool:
    return any(f.metadata.get("fallback_env") == name for f in dataclasses.fields(cls))


def test_one_symbols_setting_for_every_stage() -> None:
    names = {n for c in registered() for n in env_names(c)}
    assert "MASSIVE_SYMBOLS" in names
    assert [n for n in names if n.endswith("_SYMBOLS") and n != "MASSIVE_SYMBOLS"] == []
    rt = from_env(RuntimeSettings, {"MASSIVE_SYMBOLS": "SPX", "MASSIVE_CONSUMER": "c"})
    assert rt.symbols == ("SPX",)


def test_run_help_lists_every_processor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for name in registry.PROCESSORS:
        assert f"\n  {name}" in out, name


def test_an_unknown_processor_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown processor 'hydrater'.*hydrator"):
        registry.load("hydrater", None)  # type: ignore[arg-type]


def test_cli_refuses_a_typo_in_one_line_with_exit_code_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSIVE_")}
    env["MASSIVE_CUONT"] = "5"
    exe = Path(sys.executable).parent / "massive-pipeline"
    proc = subprocess.run(
        [str(exe), "run", "hydrator"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "configuration error: unknown setting MASSIVE_CUONT; did you mean MASSIVE_COUNT?"
    ]
