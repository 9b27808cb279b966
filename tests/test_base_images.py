"""The base images Ghost's UI offers, kept by the daemon in MongoDB so that no Ghost process needs the group `lxd`.

The daemon lists its LXD server's images (all but its own builds) into
`buildpackd_base_images` at start and every `base_images_interval`; Ghost's
patched `libs/lxd.py` serves `/lxd/status` and `/lxd/images` from there, with
Ghost's own pymongo 3.7 under Python 2.7, in the shapes Ghost 19.08 returned.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from ghost_buildpackd.lxd import IMAGE_PROP_JOB
from ghost_buildpackd.store import BaseImage, Store
from tests.support.daemon import DaemonProcess
from tests.support.ghost_sources import patched_ghost
from tests.support.ghost_sources import python2 as ghost_python2
from tests.support.waiting import wait_until

UNAVAILABLE = [["", "Container Image list is unavailable, check your LXD parameters in config.yml"]]


@pytest.mark.lxd
def test_the_daemon_keeps_the_list_fresh_and_leaves_it_when_it_stops(
    db, store: Store, lxd, base_image, write_config, tmp_path
):
    config = write_config(base_images_interval="1s")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        first = wait_until(store.load_base_images, 60, "the list, made at start")
        base = lxd.image_by_alias(base_image)
        listed = {image["fingerprint"]: image for image in first["images"]}
        assert base.fingerprint in listed
        assert base_image in listed[base.fingerprint]["aliases"]
        assert listed[base.fingerprint]["os"] == base.properties.get("os")
        published = {image.fingerprint for image in lxd.list_images() if IMAGE_PROP_JOB in image.properties}
        assert not published & set(listed)  # an app's build is never offered as a base image
        assert first["refreshed_by"]
        wait_until(
            lambda: store.load_base_images()["refreshed_at"] > first["refreshed_at"], 30, "the list refreshed again"
        )
        assert daemon.terminate() == 0
    # The last list stays: a hidden selector would make Ghost's UI save 'None' for every app edited meanwhile.
    assert base.fingerprint in {image["fingerprint"] for image in store.load_base_images()["images"]}


# --- Ghost's side: the patched libs/lxd.py, run by Python 2.7 with pymongo 3.7 ------------------------------

GHOST_READS = """
import json, sys
from libs.lxd import list_lxd_images, lxd_is_available
results = []
for config in json.loads(sys.argv[1]):
    results.append({'status': lxd_is_available(config), 'images': list_lxd_images(config)})
print(json.dumps(results))
"""

WITH_GHOSTS_PYMONGO = (
    "import sys, pymongo; sys.exit(sys.version_info[:2] != (2, 7) or pymongo.version_tuple[:2] != (3, 7))"
)

# Ghost's ghost_data.py connects this way (settings.MONGO_HOST, MONGO_PORT, MONGO_DBNAME); here to the test's database.
GHOST_DATA = """
import os
from pymongo import MongoClient
db = MongoClient(os.environ['TEST_MONGODB_URI'])[os.environ['TEST_MONGODB_DATABASE']]
"""


def ghost_answers(python2: str, tree: Path, mongo_uri: str, database: str, configs: list[dict]) -> list[dict]:
    (tree / "ghost_data.py").write_text(GHOST_DATA)
    env = {"PATH": os.environ["PATH"], "TEST_MONGODB_URI": mongo_uri, "TEST_MONGODB_DATABASE": database}
    done = subprocess.run(
        [python2, "-c", GHOST_READS, json.dumps(configs)], cwd=tree, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ghosts_patched_libs_lxd_serves_the_list_the_daemon_keeps(mongo, db, store: Store, tmp_path):
    python2 = ghost_python2(WITH_GHOSTS_PYMONGO)
    if python2 is None:
        pytest.skip("no Python 2.7 with pymongo 3.7 here (set GHOST_BUILDPACKD_TEST_PYTHON2 to one)")
    tree = patched_ghost(tmp_path)
    enabled, disabled = {"container": {"enabled": True, "endpoint": "localhost"}}, {"container": {"enabled": False}}

    def ask(*configs: dict) -> list[dict]:
        return ghost_answers(python2, tree, mongo.uri, db.name, list(configs))

    # No daemon ever listed anything: no selector, as 19.08 without LXD.
    assert ask(enabled, disabled, {}) == [{"status": False, "images": UNAVAILABLE}] * 3

    images = [
        BaseImage("a" * 64, ("debian/bookworm", "base"), "Debian bookworm amd64", "debian", "bookworm"),
        BaseImage("b" * 64, (), None, None, None),
    ]
    store.save_base_images(images, instance_id="host-a:1:abcd")
    fresh, off = ask(enabled, disabled)
    assert fresh == {
        "status": True,
        "images": [
            ["", "Don't use containers"],
            ["a" * 64, "Debian bookworm amd64 - debian/bookworm,base"],
            ["b" * 64, "None - "],  # what 19.08's format gives an image without description or alias
        ],
    }
    assert off == {"status": False, "images": UNAVAILABLE}

    # However old the list (no daemon refreshed it for a while): still offered, the selector still drawn.
    store.base_images.update_one({"_id": "selectable"}, {"$set": {"refreshed_at": datetime(2020, 1, 1)}})
    assert ask(enabled) == [fresh]
