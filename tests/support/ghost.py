"""Ghost-shaped documents and Ghost's own writes to its collections, for tests and scripts/demo.py."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo.database import Database


def b64(script: str | bytes) -> str:
    data = script.encode() if isinstance(script, str) else script
    return base64.b64encode(data).decode()


def make_app(
    db: Database,
    name: str = "shop",
    env: str = "prod",
    role: str = "web",
    color: str | None = None,
    source_container_image: str | None = "ghost-buildpackd/busybox",
    container_image: str | None = None,
    modules: list[dict[str, Any]] | None = None,
    env_vars: list[dict[str, Any]] | None = None,
    pre_buildimage: str = "",
    post_buildimage: str = "",
    features: list[dict[str, Any]] | None = None,
    region: str = "eu-west-1",
    **extra: Any,
) -> ObjectId:
    """Insert an app as Ghost's API stores it (scripts base64)."""
    build_infos: dict[str, Any] = {"source_ami": "ami-0base", "ami_name": f"ami.{env}.{region}.{role}.{name}.1"}
    if source_container_image is not None:
        build_infos["source_container_image"] = source_container_image
    if container_image is not None:
        build_infos["container_image"] = container_image
    doc: dict[str, Any] = {
        "name": name,
        "env": env,
        "role": role,
        "region": region,
        "build_infos": build_infos,
        "env_vars": env_vars or [],
        "lifecycle_hooks": {"pre_buildimage": b64(pre_buildimage), "post_buildimage": b64(post_buildimage)},
        "features": features or [],
        "modules": modules if modules is not None else [module_doc("app", "/srv/app", "echo building; touch built")],
        **extra,
    }
    if color:
        doc["blue_green"] = {"color": color, "is_online": False}
    return db.apps.insert_one(doc).inserted_id


def module_doc(name: str, path: str, build_pack: str | None, **extra: Any) -> dict[str, Any]:
    doc = {
        "name": name,
        "path": path,
        "scope": "code",
        "git_repo": f"git@example.invalid:{name}.git",
        "uid": 1001,
        "gid": 1002,
        **extra,
    }
    if build_pack is not None:
        doc["build_pack"] = b64(build_pack)
    return doc


def make_job(
    db: Database,
    app_id: ObjectId,
    command: str = "buildimage",
    status: str = "init",
    modules: list[str] | None = None,
    **extra: Any,
) -> ObjectId:
    doc: dict[str, Any] = {
        "command": command,
        "app_id": app_id,
        "status": status,
        "message": "",
        "user": "tester",
        "options": [],
        **extra,
    }
    if command == "deploy":
        doc["modules"] = [{"name": name, "rev": "main"} for name in (modules or ["app"])]
    now = datetime.now(UTC).replace(microsecond=0)  # Eve stamps both, to the second
    return db.jobs.insert_one({**doc, "_created": now, "_updated": now}).inserted_id


def set_status(db: Database, job_id: ObjectId, status: str, message: str = "") -> None:
    """Ghost's worker: update_one({_id}, {$set: {status, message, _updated}}), `_updated` in UTC."""
    db.jobs.update_one({"_id": job_id}, {"$set": {"status": status, "message": message, "_updated": datetime.now(UTC)}})


def finish_buildimage(db: Database, job_id: ObjectId, ami_id: str = "ami-0123abcd") -> None:
    set_status(db, job_id, "done", f"Build image OK: [{ami_id}]")
