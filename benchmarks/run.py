"""`scripts/bench [--quick] [--only NAME ...]`: run the benchmarks, print a table each, write JSON.

The JSON lands in bench-results/<UTC date and time>[-quick].json with the
machine (cores, LXD version and storage driver, which MongoDB served) next to
the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ghost_buildpackd.logs import configure_logging

from . import catchup, debian, deploy, fleet, footprint, ghost, ghost_buildimage, latency, throughput
from .common import REPO, Bench, Sizes, table, to_json

BENCHMARKS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "latency": latency.run,
    "deploy": deploy.run,
    "throughput": throughput.run,
    "catchup": catchup.run,
    "footprint": footprint.run,
    "debian": debian.run,
    "ghost": ghost.run,
    "ghost_buildimage": ghost_buildimage.run,
    "fleet": fleet.run,
}
# Run only when named with --only: the first run builds a Debian image and a btrfs pool (minutes); the Ghost
# benchmark needs Ghost 19.08's archive and the runtime of scripts/build-ghost-runtime.
OPT_IN = ("debian", "ghost", "ghost_buildimage")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (< 3 minutes): checks the script works")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (kept anyway on failure)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="events.poll_interval (seconds) of the daemons in poll mode and of idle polling (default 1; "
        "not the ghost benchmark's, which runs the daemon's defaults)",
    )
    parser.add_argument("--deploys", type=int, help="deploys per mode of the ghost benchmark (default 5, quick 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("console", "warning")
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.deploys is not None:
        sizes = dataclasses.replace(sizes, ghost_deploys=args.deploys)
    started = datetime.now(UTC)
    bench = Bench(sizes, args.poll_interval)
    report: dict[str, Any] = {"started": started.isoformat(), "quick": args.quick, "sizes": vars(sizes).copy()}
    failed = []
    try:
        report["environment"] = bench.environment()
        env = report["environment"]
        print(
            table(
                "Machine",
                ["cores", "LXD", "storage", "MongoDB", "change streams", "load at start"],
                [
                    [
                        env["cores"],
                        env["lxd_version"],
                        env["lxd_storage"],
                        f"{env['mongodb']} {env['mongodb_version']}",
                        env["mongodb_change_streams"],
                        " ".join(f"{load:.2f}" for load in env["load_average_at_start"]),
                    ]
                ],
            )
        )
        for name in args.only or [name for name in BENCHMARKS if name not in OPT_IN]:
            print()
            began = time.monotonic()
            try:
                report[name] = BENCHMARKS[name](bench)
                report[name]["seconds"] = time.monotonic() - began
            except Exception as error:  # the other benchmarks still run; the failure is in the report
                traceback.print_exc()
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                failed.append(name)
            print(f"   ({name}: {time.monotonic() - began:.0f} s)")
    finally:
        bench.close(keep_logs=args.keep_logs or bool(failed) or _any_failed_step(report))
    report["seconds"] = (datetime.now(UTC) - started).total_seconds()
    out = REPO / "bench-results" / (started.strftime("%Y-%m-%dT%H%M%SZ") + ("-quick" if args.quick else "") + ".json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(to_json(report))
    print(f"\nresults: {out.relative_to(REPO)} ({report['seconds']:.0f} s in all)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _any_failed_step(report: Any) -> bool:
    """A benchmark that counted failed steps (they do not stop it, but their logs are worth keeping)."""
    if isinstance(report, dict):
        return bool(report.get("failed")) or any(_any_failed_step(value) for value in report.values())
    if isinstance(report, list):
        return any(_any_failed_step(value) for value in report)
    return False


if __name__ == "__main__":
    sys.exit(main())
