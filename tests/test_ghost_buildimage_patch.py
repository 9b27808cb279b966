"""The patched `commands/buildimage.py` of Ghost 19.08, run by Python 2.7: Ghost's own `Buildimage.execute`,
`gcall` and `log`, with what needs AWS (the AMI build, the autoscaling update) replaced by recorders.

The container build runs where 19.08 ran its LXD builder: after the AMI is recorded and old AMIs purged,
before the autoscaling update; a failure ends the job `failed` with 19.08's message and skips that update.
The command is a stand-in script here (at the path the patch names, rewritten to the test's directory),
recording its arguments and exiting with the code it is given.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.ghost_sources import ghost_file, patched_ghost, python2
from tests.test_ghost_patch import COMMAND

JOB_ID = "0123456789abcdef01234567"

# What Buildimage imports and the test replaces: AWS, Packer, LXD, and libs/deploy.py's two helpers
# (made by the same patch; their rule: containers enabled, and a source image that is not ''/'None').
STUBS = {
    "ghost_aws.py": """
import json, os
def create_userdata_launchconfig_update_asg(ami_id, cloud_connection, app, config, log_file):
    open(os.environ['RECORD'], 'a').write(json.dumps(['asg_update', ami_id]) + '\\n')
    return True
""",
    "settings.py": "DEFAULT_PROVIDER = 'aws'\ncloud_connections = {'aws': lambda config, **kwargs: None}\n",
    "libs/builders/image_builder_aws.py": """
class AWSImageBuilder(object):
    def __init__(self, app, job, db, log_file, config):
        pass
    def start_builder(self):
        return 'ami-0fresh', 'ami.prod.eu-west-1.web.shop.2'
    def purge_old_images(self):
        return True
""",
    "libs/builders/image_builder_lxd.py": """
class LXDImageBuilder(object):
    def __init__(self, *args):
        raise AssertionError("Ghost's own LXD builder started")
""",
    "libs/deploy.py": """
def touch_app_manifest(app, config, log_file):
    pass
def get_path_from_app_with_color(app):
    return '/ghost/shop/prod/web'
def containers_enabled(config):
    return bool(config.get('container', {}).get('enabled'))
def container_source_image(app):
    image = app.get('build_infos', {}).get('source_container_image')
    return None if image in (None, '', 'None') else image
""",
    "libs/lxd.py": """
def lxd_is_available(config):
    raise AssertionError('LXD looked up')
""",
    "libs/provisioners/__init__.py": "",  # Ghost's reads its config through ghost_tools
    "libs/provisioners/provisioner_ansible.py": """
class GalaxyNoMatchingRolesException(Exception):
    pass
class GalaxyBadRequirementPathException(Exception):
    pass
""",
}

RUN_EXECUTE = """
import json, os, sys
from commands.buildimage import Buildimage

class Db(object):
    class apps(object):
        @staticmethod
        def update(query, change):
            open(os.environ['RECORD'], 'a').write(json.dumps(['app_update', change['$set']]) + '\\n')

class Worker(object):
    def __init__(self, app, config, log_file):
        self.app, self.job, self._db, self._config, self.log_file = app, {'_id': sys.argv[1]}, Db(), config, log_file
    def update_status(self, status, message=None):
        open(os.environ['RECORD'], 'a').write(json.dumps(['status', status, message]) + '\\n')

app = json.loads(sys.argv[2])
with open(sys.argv[4], 'a', 1) as log_file:
    Buildimage(Worker(app, json.loads(sys.argv[3]), log_file)).execute()
"""

COMMAND_STAND_IN = """#!/bin/sh
echo "$@" >> "$RECORD.command"
echo "ghost-buildpackd: stand-in output"
exit "$EXIT_CODE"
"""


def ghost_tools_stub() -> str:
    """Ghost's own `GCallException` and `gcall`, taken from its ghost_tools.py (the rest needs yaml, sh, jinja2)."""
    text = ghost_file("ghost_tools.py").decode()
    pieces = [re.search(rf"\n({head}.*?)\n(?=\S)", text, re.S) for head in ("class GCallException", "def gcall")]
    assert all(pieces), "Ghost's ghost_tools.py no longer has GCallException and gcall"
    return (
        "from subprocess import call\nfrom ghost_log import log\n\n"
        + "\n\n".join(piece.group(1) for piece in pieces if piece)
        + "\n\ndef get_aws_connection_data(*args):\n    return {}\n"
    )


@pytest.fixture
def ghost(tmp_path: Path) -> Path:
    if python2() is None:
        pytest.skip("no Python 2.7 here (set GHOST_BUILDPACKD_TEST_PYTHON2 to one)")
    tree = patched_ghost(tmp_path)
    (tree / "ghost_log.py").write_bytes(ghost_file("ghost_log.py"))  # Ghost's own
    (tree / "ghost_tools.py").write_text(ghost_tools_stub())
    for name, source in STUBS.items():
        (tree / name).write_text(source)
    stand_in = tmp_path / "ghost-buildpackd"
    stand_in.write_text(COMMAND_STAND_IN)
    stand_in.chmod(0o755)
    buildimage = tree / "commands" / "buildimage.py"
    assert COMMAND in buildimage.read_text()
    buildimage.write_text(buildimage.read_text().replace(COMMAND, str(stand_in)))
    return tree


def execute(tree: Path, tmp_path: Path, exit_code: int, enabled: bool, source_image: str) -> tuple[list, list, str]:
    """Run Buildimage.execute once; what it recorded, the stand-in command's arguments, the job log."""
    record, job_log = tmp_path / "record.jsonl", tmp_path / f"{JOB_ID}.txt"
    for path in (record, job_log, Path(f"{record}.command")):
        path.unlink(missing_ok=True)
    app = {"_id": "a1", "build_infos": {"source_container_image": source_image}, "autoscale": {"name": "asg-web"}}
    config = {"container": {"enabled": enabled, "endpoint": "localhost"}}
    env = {"PATH": "/usr/bin:/bin", "RECORD": str(record), "EXIT_CODE": str(exit_code)}
    argv = [python2() or "", "-c", RUN_EXECUTE, JOB_ID, json.dumps(app), json.dumps(config), str(job_log)]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    command = Path(f"{record}.command")
    return events, command.read_text().split() if command.exists() else [], job_log.read_text()


def test_the_build_runs_after_the_ami_and_before_the_autoscaling_update(ghost: Path, tmp_path: Path):
    events, command, log = execute(ghost, tmp_path, 0, enabled=True, source_image="ghost-buildpackd/busybox")
    assert command == ["buildimage", "--", JOB_ID]
    assert events == [
        ["app_update", {"ami": "ami-0fresh", "build_infos.ami_name": "ami.prod.eu-west-1.web.shop.2"}],
        ["asg_update", "ami-0fresh"],
        ["status", "done", "Build image OK: [ami-0fresh]"],
    ]
    # Ghost's gcall: the description and the command line in the job log, then the command's own output.
    order = ["Old AMIs removed for this app", "Container image: build in a container", "CMD: ", "stand-in output"]
    assert [log.index(text) for text in order] == sorted(log.index(text) for text in order), log


def test_a_failed_build_fails_the_job_with_ghosts_message_and_skips_the_autoscaling_update(ghost: Path, tmp_path: Path):
    events, command, _log = execute(ghost, tmp_path, 65, enabled=True, source_image="ghost-buildpackd/busybox")
    assert command == ["buildimage", "--", JOB_ID]
    assert events[-1] == [
        "status",
        "failed",
        "An error occured during container process ('ERROR: Container image: build in a container')",
    ]
    assert ["asg_update", "ami-0fresh"] not in events


@pytest.mark.parametrize(("enabled", "source_image"), [(False, "ghost-buildpackd/busybox"), (True, ""), (True, "None")])
def test_no_build_without_containers_or_a_source_image(ghost: Path, tmp_path: Path, enabled: bool, source_image: str):
    events, command, _log = execute(ghost, tmp_path, 65, enabled=enabled, source_image=source_image)
    assert command == []
    assert events[-1] == ["status", "done", "Build image OK: [ami-0fresh]"]
