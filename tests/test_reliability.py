"""Reliability: secrets masked whole, provisioner trees checked, deadlines on probes and LXD operations."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

from pymongo.database import Database
from structlog.testing import capture_logs

from ghost_buildpackd.config import Config
from ghost_buildpackd.joblog import JobLog, OutputCollector
from ghost_buildpackd.logs import Secrets
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.store import SUCCEEDED, Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import make_app, make_job, module_doc
from tests.support.steps import deploy_context
from tests.test_deploy import image_alias, job_log, run_deploy  # noqa: F401  (image_alias is a fixture)


def pem_key(seed: int) -> str:
    """A PEM-shaped multi-line secret: 64-character base64 lines between the armour lines."""
    body = base64.b64encode(bytes((seed * 7 + i * 13) % 256 for i in range(640))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN PRIVATE KEY-----", *lines, "-----END PRIVATE KEY-----"])


def key_lines(key: str) -> list[str]:
    return key.splitlines()


# --- masking ------------------------------------------------------------------------------


class _Silent:
    def info(self, *_args: object, **_fields: object) -> None:
        pass

    warning = info


def test_every_line_of_a_multi_line_secret_is_masked_in_a_log_string() -> None:
    key = pem_key(1)
    with Secrets.registered([key]):
        masked = Secrets.redact(f"error: {key}\nlater, line 3 alone: {key_lines(key)[3]}")
    assert all(line not in masked for line in key_lines(key)), masked
    assert masked.startswith("error: ***") and masked.endswith("line 3 alone: ***")


def test_a_secret_across_the_forced_split_of_a_long_line_is_masked(tmp_path: Path) -> None:
    key = pem_key(2)
    secret_line = key_lines(key)[2]
    # A line with no newline past the forced-split length, with a secret line where the split falls.
    data = b"x" * ((64 << 10) - 20) + secret_line.encode() + b"y" * 100 + b"\n"
    job_log_ = JobLog(tmp_path, "job", "test")
    with Secrets.registered([key]):
        for cut in (len(data) - 150, (64 << 10) - 10, (64 << 10) + 5):  # chunk ends inside the secret, after it
            collector = OutputCollector(job_log_, _Silent(), 1 << 30, 1 << 20)
            collector(data[:cut])
            collector(data[cut:])
            collector.finish()
    written = job_log_.path.read_text()
    assert secret_line not in written.replace("\n", "").replace("[test] ", "")
    assert written.count("***") == 3


def test_a_multi_line_secret_is_masked_in_the_job_log_and_the_structured_log_of_a_real_step(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,  # noqa: F811
    ghost_dirs: dict[str, Path],
    lxd_cleanup: None,
) -> None:
    key = pem_key(3)
    build_pack = """echo "the key: $TLS_KEY"
printf '%s' "$(head -c 65500 /dev/zero | tr '\\0' x)"; echo "$TLS_KEY" | tr -d '\\n'; echo
echo buildpack-done
"""
    env_vars = [{"var_key": "TLS_KEY", "var_value": key}]
    app_id = make_app(db, container_image=image_alias, modules=[module_doc("app", "/srv/app", build_pack)],
                      env_vars=env_vars)  # fmt: skip
    job_id = make_job(db, app_id, command="deploy", status="started", modules=["app"])
    module_dir = ghost_dirs["root"] / "shop" / "prod" / "web" / "app"
    module_dir.mkdir(parents=True)
    os.chown(module_dir, *WORKING_COPY_IDS)

    with capture_logs() as events:
        outcome = run_deploy(deploy_context(make_config(), store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    text = job_log(make_config(), job_id)
    assert "the key: ***" in text and "buildpack-done" in text
    logged = repr(events)
    glued = text.replace("\n", "")  # a forced split must not leave a secret in two halves either
    for line in key_lines(key):
        assert line not in text and line not in glued and line not in logged, line
        assert line not in outcome.output_tail
    assert leftover_containers(lxd, db) == []
