"""`ghost-buildpackd buildpack JOB_ID MODULE`: what Ghost's worker runs for a module script, and
`ghost-buildpackd buildimage JOB_ID`: what its buildimage job runs for the container build.

Ghost 19.08 (Python 2.7) runs it through its `gcall`, whose stdout and stderr go
straight into the job's log. So it prints exactly one outcome line; the script's
own output reaches the job log once, written there by the daemon as it runs.
The exit code says what happened (EXIT_CODES, the same for both commands; for a
build the failing command's code stands for the script's); `gcall` fails the
job on any code but 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..config import Config
from ..model import CANCELLED, FAILED, SKIPPED, SUCCEEDED
from ..policy import LIMITS
from ..store import Store, redacted_uri, short_error
from .client import ABANDONED, NO_DAEMON, BuildpackResult, run_buildimage, run_buildpack

EXIT_OK = 0  # the script succeeded, or there was nothing to run
EXIT_USAGE = 2  # bad arguments or configuration: nothing was asked
EXIT_REFUSED = 65  # the daemon refused (bad input, containers off for the app, no image) or could not run it
EXIT_CANCELLED = 66  # the job ended, or the request was cancelled, before the script finished
EXIT_TIMED_OUT = 67  # --timeout ran out (the request is cancelled), or container.exec_timeout killed the script
EXIT_NO_DAEMON = 69  # no live daemon on this host (heartbeat, restart grace), or MongoDB unreachable: nothing ran
# Any other non-zero code is the script's own exit code.

EXIT_CODES = {
    EXIT_OK: "succeeded, or nothing to run",
    EXIT_USAGE: "bad arguments or configuration",
    EXIT_REFUSED: "refused, or could not run",
    EXIT_CANCELLED: "cancelled",
    EXIT_TIMED_OUT: "timed out",
    EXIT_NO_DAEMON: "no live daemon on this host",
}


def exit_code_for(result: BuildpackResult) -> int:
    """The command's exit code for an outcome."""
    if result.state in (SUCCEEDED, SKIPPED):
        return EXIT_OK
    if result.state == FAILED:
        if result.timed_out:
            return EXIT_TIMED_OUT
        if result.exit_code:  # the script ran and failed: its own code
            return result.exit_code
        return EXIT_REFUSED
    if result.state == CANCELLED:
        return EXIT_CANCELLED
    if result.state == ABANDONED:
        return EXIT_TIMED_OUT
    if result.state == NO_DAEMON:
        return EXIT_NO_DAEMON
    return EXIT_REFUSED


def outcome_line(subject: str, result: BuildpackResult, code: int) -> str:
    """The one line Ghost's job log gets from this command; `subject` says what ran (`build_pack of module api`)."""
    what = f"ghost-buildpackd: {subject}"
    if result.state == SKIPPED:
        return f"{what}: nothing to run ({result.message}), exit {code}"
    if code == EXIT_OK:
        return f"{what}: succeeded in a container, exit {code}"
    kind = "script failed" if result.state == FAILED and code == result.exit_code else EXIT_CODES[code]
    return f"{what}: {kind}: {result.message}, exit {code}"


def buildpack_command(config: Config, job_id: str, module: str, script: str, timeout: float | None, out: TextIO) -> int:
    """Ask this host's daemon to run the script, wait, print one line, return the exit code."""

    def ask(db: Database) -> BuildpackResult:
        return run_buildpack(
            db,
            job_id,
            module,
            timeout=timeout or config.buildpack.timeout,
            host=config.host_name,
            poll_interval=LIMITS.client_poll,
            script=script,
            daemon_max_age=LIMITS.heartbeat_max_age(config),
            restart_grace=LIMITS.restart_grace(config),
            build_wait=config.buildpack.build_wait,
            job_log_dir=config.ghost.log_dir,
            ghost_root=config.ghost.root,
        )

    return ask_and_report(config, f"{script} of module {module}", ask, out)


def buildimage_command(config: Config, job_id: str, timeout: float | None, out: TextIO) -> int:
    """Ask this host's daemon to build the job's container image now, wait, print one line, return the exit code."""

    def ask(db: Database) -> BuildpackResult:
        return run_buildimage(
            db,
            job_id,
            timeout=timeout or config.buildpack.timeout,
            host=config.host_name,
            poll_interval=LIMITS.client_poll,
            daemon_max_age=LIMITS.heartbeat_max_age(config),
            restart_grace=LIMITS.restart_grace(config),
        )

    return ask_and_report(config, f"container build of job {job_id}", ask, out)


def ask_and_report(config: Config, subject: str, ask: Callable[[Database], BuildpackResult], out: TextIO) -> int:
    """Run one request against MongoDB, print its one outcome line, return the exit code."""
    store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
    try:
        store.ping()  # bounded by mongodb.timeout, where the calls below would retry through an outage
        result = ask(store.db)
    except ValueError as error:
        out.write(f"ghost-buildpackd: {subject}: bad arguments: {error}, exit {EXIT_USAGE}\n")
        return EXIT_USAGE
    except PyMongoError as error:
        reason = f"cannot reach MongoDB at {redacted_uri(config.mongodb.uri)}: {short_error(error)}"
        out.write(f"ghost-buildpackd: {subject}: {reason}, exit {EXIT_NO_DAEMON}\n")
        return EXIT_NO_DAEMON
    finally:
        store.db.client.close()
    code = exit_code_for(result)
    out.write(outcome_line(subject, result, code) + "\n")
    return code
