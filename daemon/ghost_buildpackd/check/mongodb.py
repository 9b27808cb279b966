"""The MongoDB checks: reachable and authenticated, a supported version, the event mode, Ghost's collections."""

from __future__ import annotations

import re
from collections.abc import Callable

import pymongo

from ..config import Config
from ..ghost.config_yml import GHOST_MONGO_DBNAME
from ..policy import MONGODB_NEWEST_TESTED, MONGODB_OLDEST
from ..store import Store, redacted_uri, short_error
from .result import CheckResult, fail, ok, warn

GHOST_COLLECTIONS = ("jobs", "apps")


def mongo_checks(config: Config, report: Callable[[CheckResult], None]) -> Store | None:
    """Reachable and authenticated, event mode, Ghost's collections; the Store when reachable."""
    where = redacted_uri(config.mongodb.uri)
    store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
    try:
        store.ping()
        server = store.server_info()
        version = server["version"]
    except Exception as error:
        store.db.client.close()
        if "wire version" in str(error):  # pymongo refuses a server older than its floor before any command
            report(mongodb_version_check(None, "unknown"))
        report(
            fail(
                "mongodb",
                f"cannot reach or authenticate to {where} within {config.mongodb.timeout:g}s: {short_error(error)}",
                "check mongodb.uri or mongodb.uri_file (or GHOST_BUILDPACKD_MONGODB_URI; left out: MONGO_HOST, else "
                "mongo_host of Ghost's config.yml, port 27017), that MongoDB listens there, and the credentials",
            )
        )
        for name in ("mongodb events", "ghost collections"):
            report(fail(name, "not checked: MongoDB is unreachable", "fix the mongodb check first"))
        return None
    report(ok("mongodb", f"reachable and authenticated at {where} (MongoDB {version})"))
    report(mongodb_version_check(server["max_wire_version"], version))
    report(events_check(config, store))
    report(collections_check(config, store))
    return store


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def mongodb_version_check(max_wire_version: int | None, version: str) -> CheckResult:
    """The server against the supported range (policy.MONGODB_OLDEST to MONGODB_NEWEST_TESTED)."""
    oldest, newest = (".".join(map(str, v)) for v in (MONGODB_OLDEST, MONGODB_NEWEST_TESTED))
    supported = f"supported: MongoDB {oldest} to {newest} (pymongo {pymongo.version})"
    found = version_tuple(version) if version != "unknown" else ()
    if not found or found < MONGODB_OLDEST:
        wire = max_wire_version if max_wire_version is not None else "unknown"
        return fail(
            "mongodb version",
            f"MongoDB {version} (wire version {wire}) is older than the oldest supported; {supported}",
            f"upgrade MongoDB to {oldest} or newer (an in-place upgrade one release at a time, as MongoDB documents)",
        )
    if found > MONGODB_NEWEST_TESTED:
        return warn(
            "mongodb version",
            f"MongoDB {version} is newer than the newest tested ({newest}); {supported}",
            "nothing to do if it works; report what does not",
        )
    return ok("mongodb version", f"MongoDB {version}; {supported}")


def events_check(config: Config, store: Store) -> CheckResult:
    supported, reason = store.change_streams_supported()
    picked = "change_stream" if supported else "poll"
    if config.events.mode == "change_stream" and not supported:
        return fail(
            "mongodb events",
            f"events.mode is change_stream but {reason}",
            "run MongoDB as a replica set (a single-node one will do), or set events.mode: auto",
        )
    if config.events.mode == "poll":
        return ok("mongodb events", f"events.mode poll (every {config.events.poll_interval:g}s); {reason}")
    return ok("mongodb events", f"{reason}: events.mode {config.events.mode} uses {picked}")


GHOST_DATABASE_HINT = (
    f"Ghost's database is {GHOST_MONGO_DBNAME!r} (settings.py hard-codes it) on the host of MONGO_HOST, else of "
    "mongo_host in Ghost's config.yml, port 27017: leave mongodb.uri and mongodb.database out to use those, "
    "or set them to where Ghost's apps live"
)


def collections_check(config: Config, store: Store) -> CheckResult:
    """Ghost's collections. Eve makes a collection at its first insert: a Ghost that never ran a job has no
    `jobs`, one without an app has no `apps` either (then this may as well be another database: a warning)."""
    names = set(store.collection_names())
    database = config.mongodb.database
    if "apps" not in names:
        return warn(
            "ghost collections",
            f"database {database!r} has no apps collection: not Ghost's database, or a Ghost without any app yet",
            GHOST_DATABASE_HINT,
        )
    if "jobs" not in names:
        return ok("ghost collections", f"database {database!r} holds apps, no job yet (Eve makes jobs at the first)")
    return ok("ghost collections", f"database {database!r} holds {', '.join(GHOST_COLLECTIONS)}")
