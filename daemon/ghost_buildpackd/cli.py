"""Command line: `ghost-buildpackd run|check|status|reconcile|replay|buildpack|buildimage`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .config import Config, ConfigError, config_path, load_config
from .logs import configure_logging
from .model import BUILD_PACK, MODULE_SCRIPTS
from .value_parsers import parse_duration

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghost-buildpackd",
        description="Runs Ghost's container steps (image builds after each AMI, module buildpacks at "
        "deploy) in LXD containers, driven by Ghost's MongoDB jobs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config_help = "configuration file (default: $GHOST_BUILDPACKD_CONFIG, else /etc/ghost-buildpackd/config.yml)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # --config is also accepted after the command (`ghost-buildpackd check --config x.yml`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, parents=[common])

    command("run", "run the daemon (what the systemd service starts)")
    command("check", "check that this host can work: MongoDB, LXD, idmap, directories")
    status = command("status", "daemon instances, event lag, steps in flight and finished, images")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--last", type=int, default=10, metavar="N", help="finished steps to show (default 10)")
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 1, naming each problem, when no instance is alive on this host, the event lag is over "
        "--max-lag, or more than --max-failures steps failed within --window",
    )
    status.add_argument("--max-lag", type=_duration, default="5m", metavar="DURATION", help="default 5m")
    status.add_argument("--max-failures", type=int, default=0, metavar="N", help="default 0")
    status.add_argument("--window", type=_duration, default="1h", metavar="DURATION", help="default 1h")
    reconcile = command("reconcile", "delete container images whose AMIs were pruned")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    reconcile.add_argument("--app", metavar="APP_ID", help="only this app")
    replay = command("replay", "run a finished buildimage step of a job again")
    replay.add_argument("job_id", metavar="JOB_ID")
    buildpack = command(
        "buildpack",
        "run a module's script in a container for a deploy job (what Ghost's worker calls); "
        "prints one outcome line, exits 0, the script's own code, or 65 refused, 66 cancelled, 67 timed out, "
        "69 no live daemon on this host",
    )
    buildpack.add_argument("job_id", metavar="JOB_ID", help="the deploy (or redeploy) job's id")
    buildpack.add_argument("module", metavar="MODULE", help="the module's name")
    buildpack.add_argument("--script", choices=MODULE_SCRIPTS, default=BUILD_PACK, help="default: build_pack")
    buildpack.add_argument(
        "--timeout", type=_duration, metavar="DURATION", help="e.g. 40m (default: buildpack.timeout)"
    )
    buildimage = command(
        "buildimage",
        "build the container image of a buildimage job now, on this host (what Ghost's buildimage job calls once "
        "its AMI is recorded); prints one outcome line, exits 0, the failing command's code, or 65 refused, "
        "66 cancelled, 67 timed out, 69 no live daemon on this host",
    )
    buildimage.add_argument("job_id", metavar="JOB_ID", help="the buildimage job's id")
    buildimage.add_argument(
        "--timeout", type=_duration, metavar="DURATION", help="e.g. 40m (default: buildpack.timeout)"
    )
    return parser


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration above zero, got {text!r}")
    return seconds


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as error:
        print(f"ghost-buildpackd: invalid configuration ({len(error.problems)} problem(s)):", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "buildpack":
        from .ghost.commands import buildpack_command

        # Its output lands in Ghost's job log: only the outcome line, and errors.
        configure_logging(config.log.format, "error")
        return buildpack_command(config, args.job_id, args.module, args.script, args.timeout, sys.stdout)
    if args.command == "buildimage":
        from .ghost.commands import buildimage_command

        configure_logging(config.log.format, "error")  # as for buildpack: its output lands in Ghost's job log
        return buildimage_command(config, args.job_id, args.timeout, sys.stdout)
    configure_logging(config.log.format, config.log.level)
    if args.command == "run":
        from .daemon import run_daemon

        return run_daemon(config)
    if args.command == "check":
        from .check import run_checks

        return run_checks(config, sys.stdout)
    if args.command == "status":
        from .status import Thresholds, check_status, show_status

        if args.check:
            thresholds = Thresholds(max_lag=args.max_lag, max_failures=args.max_failures, window=args.window)
            return check_status(config, sys.stdout, as_json=args.json, thresholds=thresholds)
        return show_status(config, sys.stdout, as_json=args.json, last=args.last)
    if args.command == "reconcile":
        from .operator_commands import reconcile_command

        return reconcile_command(config, sys.stdout, dry_run=args.dry_run, app_id=args.app)
    if args.command == "replay":
        from .operator_commands import replay_job

        return replay_job(config, args.job_id, sys.stdout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
