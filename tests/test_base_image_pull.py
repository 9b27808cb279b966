"""Base images as Ghost's UI stores them: a fingerprint on Ghost's `container.endpoint`, pulled over LXD's protocol.

What this machine allows: the real LXD asked to pull from an endpoint that does
not answer (the step fails naming the endpoint and the fingerprint), and a
fingerprint already local never going to the endpoint. A pull that succeeds
needs a second LXD serving images over https, which these machines do not have.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ghost_buildpackd import images
from ghost_buildpackd.images import ImageNotFound
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import BUILDIMAGE
from ghost_buildpackd.steps import StepFailed, buildimage
from tests.support.ghost import finish_buildimage, make_app, make_job
from tests.support.mongo import free_port
from tests.support.steps import step_context

pytestmark = pytest.mark.lxd


def unknown_fingerprint() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def ghost_config(tmp_path: Path, endpoint: str) -> Path:
    path = tmp_path / "ghost-config.yml"
    path.write_text(yaml.safe_dump({"container": {"enabled": True, "endpoint": endpoint}}))
    return path


def test_an_unreachable_endpoint_fails_the_build_naming_it_and_the_fingerprint(
    db, store, make_config, tmp_path, lxd_cleanup
):
    endpoint = f"https://127.0.0.1:{free_port()}"
    config = make_config(ghost={"config": str(ghost_config(tmp_path, endpoint))})
    assert config.lxd.image_server == endpoint  # from Ghost's config.yml
    fingerprint = unknown_fingerprint()
    job = make_job(db, make_app(db, source_container_image=fingerprint), "buildimage", "started")
    finish_buildimage(db, job)
    lxd = Lxd(config.lxd)
    ctx = step_context(config, store, lxd, job, BUILDIMAGE)

    started = time.monotonic()
    with pytest.raises(StepFailed) as raised:
        buildimage.run(ctx)

    assert time.monotonic() - started < 60
    message = raised.value.message
    assert message.startswith("base image (app.build_infos.source_container_image): ")
    assert f"pulling fingerprint {fingerprint} from {endpoint}" in message
    assert "over LXD's protocol failed" in message
    assert lxd.image_by_fingerprint(fingerprint) is None


def test_a_local_fingerprint_never_goes_to_the_endpoint(make_config, tmp_path, base_image):
    endpoint = f"https://127.0.0.1:{free_port()}"  # nothing listens: a pull would fail
    config = make_config(ghost={"config": str(ghost_config(tmp_path, endpoint))})
    lxd = Lxd(config.lxd)
    local = lxd.image_by_alias(base_image)
    assert local is not None
    assert images.base_image(lxd, local.fingerprint, config.lxd.image_server).fingerprint == local.fingerprint


def test_localhost_means_local_images_only(make_config, tmp_path):
    config = make_config(ghost={"config": str(ghost_config(tmp_path, "localhost"))})
    assert config.lxd.image_server is None
    fingerprint = unknown_fingerprint()
    with pytest.raises(ImageNotFound) as raised:
        images.base_image(Lxd(config.lxd), fingerprint, config.lxd.image_server)
    assert f"no LXD image matches {fingerprint!r}" in str(raised.value)
    assert "pulling" not in str(raised.value)
