"""`ghost-buildpackd check` against the test LXD and MongoDB: truthful OK lines, and the FAIL lines with fixes."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from ghost_buildpackd.config import Config
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.store import Store
from tests.support.ghost import make_app
from tests.support.mongo import free_port

pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]


def check_lines(config: Config) -> tuple[int, dict[str, str]]:
    """Exit code and {check name: its OK/FAIL line plus the fix line}."""
    from ghost_buildpackd.check import run_checks

    out = io.StringIO()
    code = run_checks(config, out)
    lines: dict[str, str] = {}
    name = ""
    for line in out.getvalue().splitlines():
        if line.startswith(("OK  ", "FAIL")):
            name = line[6:].split(":", 1)[0]
            lines[name] = line
        elif line.startswith("      fix:"):
            lines[name] += "\n" + line
    return code, lines


def test_all_ok_on_a_good_host(store: Store, lxd: Lxd, base_image: str, make_config: Callable[..., Config]) -> None:
    make_app(store.db, source_container_image=base_image)  # Ghost's collections exist, and name the image
    code, lines = check_lines(make_config())
    print("\n".join(lines.values()))
    assert code == 0, "\n".join(lines.values())
    assert all(line.startswith("OK") for line in lines.values())
    assert set(lines) >= {"mongodb", "mongodb events", "ghost collections", "lxd", "lxd storage", "lxd container"}
    assert "reachable and authenticated" in lines["mongodb"]
    assert "speaks wire version" in lines["mongodb version"] and "pymongo " in lines["mongodb version"]
    assert "uses change_stream" in lines["mongodb events"] or "uses poll" in lines["mongodb events"]
    assert f"LXD {lxd.server_info()['version']}" in lines["lxd"]
    assert "default" in lines["lxd storage"]
    assert "with raw.idmap and deleted gbp-check-" in lines["lxd container"]
    assert base_image in lines["lxd container"]
    assert "root may map 1001:1002" in lines["idmap"]
    assert "the user this check runs as" in lines["ghost.log_dir"]
    assert all(not instance.name.startswith("gbp-check-") for instance in lxd.client.instances.all())


def test_fail_lines_name_the_problem_and_the_fix(
    lxd: Lxd, base_image: str, make_config: Callable[..., Config], ghost_dirs: dict[str, Path]
) -> None:
    closed = free_port()
    missing_log_dir = ghost_dirs["log_dir"] / "nope"
    config = make_config(
        mongodb={"uri": f"mongodb://127.0.0.1:{closed}/", "timeout": "1s"},
        ghost={"log_dir": str(missing_log_dir)},
        container={"idmap_user": "54321:54322"},  # no root:54321:1 in /etc/subuid
    )
    code, lines = check_lines(config)
    assert code == 1
    assert lines["mongodb"].startswith("FAIL") and f"127.0.0.1:{closed}" in lines["mongodb"]
    assert "fix: check mongodb.uri" in lines["mongodb"]
    assert lines["ghost collections"].startswith("FAIL") and "not checked" in lines["ghost collections"]
    assert lines["ghost.log_dir"].startswith("FAIL") and f"{missing_log_dir} does not exist" in lines["ghost.log_dir"]
    assert (
        lines["idmap"].startswith("FAIL") and "missing root:54321:1 in /etc/subuid and root:54322:1" in lines["idmap"]
    )
    assert "fix: echo root:54321:1 >> /etc/subuid" in lines["idmap"]
    # What works is still reported as working: LXD does not depend on MongoDB.
    assert lines["lxd"].startswith("OK") and lines["ghost.root"].startswith("OK")
    assert lines["lxd container"].startswith("OK")
    assert all(not instance.name.startswith("gbp-check-") for instance in lxd.client.instances.all())


def test_missing_compressor_and_unknown_idmap_user(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ghost_buildpackd import check

    monkeypatch.setenv("PATH", "/nonexistent")
    result = check.compressor_check(make_config(container={"publish_compression": "zstd"}))
    assert not result.ok and "zstd is not on PATH" in result.detail
    result = check.idmap_check(make_config(container={"idmap_user": "no-such-user-gbp"}))
    assert not result.ok and "is no user on this host" in result.detail


def test_a_server_older_than_pymongos_floor_fails_with_the_floor() -> None:
    import pymongo

    from ghost_buildpackd.check import wire_version_check

    floor = pymongo.common.MIN_SUPPORTED_WIRE_VERSION
    assert wire_version_check(floor, "x").ok
    result = wire_version_check(floor - 1, "3.6.23")
    assert not result.ok
    assert f"MongoDB 3.6.23 (wire version {floor - 1}) is older than the floor: pymongo {pymongo.version} needs " in (
        result.detail
    )
    assert "upgrade MongoDB to" in result.fix
    assert not wire_version_check(None, "unknown").ok
