"""The whole flow against a running daemon process: buildimage, then deploy driven by Ghost's client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghost_buildpackd.model import SUCCEEDED, step_id
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.steps import terminal_step
from tests.support.waiting import wait_until

SECRET = "e2e-secret-value-7f3a"

CLIENT = """
import json, sys
from pymongo import MongoClient
from ghost_buildpackd.ghost.client import run_buildpack
db = MongoClient(sys.argv[1], tz_aware=True)[sys.argv[2]]
result = run_buildpack(db, sys.argv[3], sys.argv[4], timeout=60, poll_interval=0.2)
print(json.dumps({"state": result.state, "exit_code": result.exit_code, "message": result.message,
                  "tail": result.output_tail}))
"""


@pytest.mark.lxd
def test_buildimage_then_deploy_through_the_client(
    mongo, db, store, lxd, base_image, write_config, ghost_dirs, tmp_path, published_aliases
):
    app = make_app(
        db,
        name="shop",
        source_container_image=base_image,
        env_vars=[{"var_key": "API_TOKEN", "var_value": SECRET}],
        pre_buildimage='echo "pre hook for $GHOST_APP"; mkdir -p /opt/shop; echo pre > /opt/shop/pre',
        post_buildimage='echo post hook; echo "$API_TOKEN" > /opt/shop/token',
        modules=[
            module_doc(
                "api",
                "/srv/api",
                'echo "buildpack in $(pwd) for $GHOST_MODULE_NAME"; cat /opt/shop/pre; '
                'echo "$API_TOKEN" | wc -c; mkdir -p vendor; echo dep > vendor/lib.txt',
            )
        ],
    )
    config = write_config(container={"exec_timeout": "60s"})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()

        build = make_job(db, app)
        published_aliases.append(str(build))
        finish_buildimage(db, build, ami_id="ami-0e2e0001")
        step = wait_until(lambda: terminal_step(store, step_id(build, "buildimage")), 90, "the image build")
        assert step.state == SUCCEEDED, step.message
        image = lxd.image_by_alias(str(build))
        assert image is not None
        assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(build)
        record = store.get_image_record(str(build))
        assert (record.fingerprint, record.ami_id) == (image.fingerprint, "ami-0e2e0001")
        build_log = (ghost_dirs["log_dir"] / f"{build}.txt").read_text()
        assert "pre hook for shop" in build_log and "post hook" in build_log

        working_copy = ghost_dirs["root"] / "shop" / "prod" / "web" / "api"
        deploy = make_job(db, app, command="deploy", modules=["api"])
        set_status(db, deploy, "started")
        sid = step_id(deploy, "deploy", "api")
        wait_until(lambda: (s := store.get_step(sid)) is not None and s.state == "ready", 60, "container prepared")
        working_copy.mkdir(parents=True)  # Ghost clones the module after the job started
        (working_copy / "app.py").write_text("print('hi')\n")
        for path in (working_copy, working_copy / "app.py"):
            os.chown(path, *WORKING_COPY_IDS)

        client = subprocess.run(
            [sys.executable, "-c", CLIENT, mongo.uri, db.name, str(deploy), "api"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result = json.loads(client.stdout)
        assert result["state"] == SUCCEEDED, result
        assert result["exit_code"] == 0
        assert "buildpack in /srv/api for api" in result["tail"]
        made = working_copy / "vendor" / "lib.txt"
        assert made.read_text() == "dep\n"
        assert (made.stat().st_uid, made.stat().st_gid) == WORKING_COPY_IDS
        assert (made.parent.stat().st_uid, made.parent.stat().st_gid) == WORKING_COPY_IDS
        set_status(db, deploy, "done")
        assert daemon.terminate() == 0

    assert leftover_containers(lxd, db) == []
    logs = daemon.log_path.read_text() + "".join(p.read_text() for p in Path(ghost_dirs["log_dir"]).iterdir())
    assert SECRET not in logs
