"""Image records (`container_images`), what retention reads beside them, and the base-image list Ghost's UI
offers (`buildpackd_base_images`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from ..model import ACTIVE, BUILDIMAGE
from .connection import BASE_IMAGES_ID, Connection, retry_transient


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """An image Ghost's UI may offer as an app's base image (`buildpackd_base_images`), in the words of
    Ghost 19.08's `list_lxd_images`: the fingerprint it stores, the description and aliases it shows."""

    fingerprint: str
    aliases: tuple[str, ...]
    description: str | None  # the image's `description` property; None when it has none (Ghost shows "None")
    os: str | None
    release: str | None

    def to_doc(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "aliases": list(self.aliases)}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A `container_images` record: one image the daemon published."""

    alias: str
    fingerprint: str
    job_id: ObjectId
    app_id: ObjectId
    app_identity: str
    app_label: str
    region: str
    ami_id: str
    ami_name: str
    base_image: str
    size: int
    created_at: datetime
    state: str = "live"  # live | pruned
    pruned_reason: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["_id"] = doc.pop("alias")
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ImageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in doc.items() if key in names}
        return cls(alias=doc["_id"], **values)


class Images(Connection):
    """The images the daemon published, and the base images it offers."""

    @retry_transient
    def record_image(self, record: ImageRecord, claim: int = 0) -> bool:
        """Write the record unless one made by a later claim of the step exists (then False: fenced out).

        `claim` is the fencing token: a holder that paused and lost its step
        cannot overwrite what its successor recorded.
        """
        doc = {**record.to_doc(), "claim": claim}
        # A record written before claims were recorded counts as claim 0.
        self.images.update_one({"_id": record.alias, "claim": {"$exists": False}}, {"$set": {"claim": 0}})
        try:
            self.images.replace_one({"_id": record.alias, "claim": {"$lte": claim}}, doc, upsert=True)
        except DuplicateKeyError:  # the record exists, with a later claim
            return False
        return True

    @retry_transient
    def get_image_record(self, alias: str) -> ImageRecord | None:
        doc = self.images.find_one({"_id": alias})
        return ImageRecord.from_doc(doc) if doc else None

    @retry_transient
    def image_records(self, app_id: ObjectId | None = None, state: str | None = "live") -> list[ImageRecord]:
        query: dict[str, Any] = {}
        if app_id is not None:
            query["app_id"] = app_id
        if state is not None:
            query["state"] = state
        return [ImageRecord.from_doc(doc) for doc in self.images.find(query).sort("created_at", -1)]

    @retry_transient
    def mark_image_pruned(self, alias: str, reason: str) -> None:
        self.images.update_one(
            {"_id": alias},
            {"$set": {"state": "pruned", "pruned_reason": reason}, "$currentDate": {"pruned_at": True}},
        )

    @retry_transient
    def all_image_aliases(self) -> set[str]:
        """Aliases of every `container_images` record, whatever its state."""
        return {str(doc["_id"]) for doc in self.images.find({}, {"_id": 1})}

    @retry_transient
    def apps_container_images(self) -> dict[str, list[str]]:
        """Each `build_infos.container_image` any app names -> the ids of those apps (retention never touches them)."""
        named: dict[str, list[str]] = {}
        for doc in self.apps.find({"build_infos.container_image": {"$exists": True}}):
            value = (doc.get("build_infos") or {}).get("container_image")
            if isinstance(value, str) and value:
                named.setdefault(value, []).append(str(doc["_id"]))
        return named

    @retry_transient
    def active_step_images(self) -> dict[str, list[str]]:
        """Image aliases recorded (field `image`) on steps in flight -> the ids of those steps."""
        used: dict[str, list[str]] = {}
        for doc in self.steps.find({"state": {"$in": list(ACTIVE)}, "image": {"$exists": True}}):
            if isinstance(doc.get("image"), str) and doc["image"]:
                used.setdefault(doc["image"], []).append(str(doc["_id"]))
        return used

    @retry_transient
    def ended_buildimage_jobs(self, app_ids: list[ObjectId]) -> list[dict[str, Any]]:
        """Ghost's buildimage jobs of these apps that ended `done` or `failed` (the caller keeps those that
        built their AMI: `ghost.documents.Job.built_image`)."""
        query = {"command": BUILDIMAGE, "status": {"$in": ["done", "failed"]}, "app_id": {"$in": list(app_ids)}}
        return list(self.jobs.find(query))

    @retry_transient
    def save_base_images(self, images: Iterable[BaseImage], instance_id: str) -> None:
        """Replace the list Ghost's UI offers (`refreshed_at`, on the server's clock, says how old it is)."""
        self.base_images.update_one(
            {"_id": BASE_IMAGES_ID},
            {
                "$set": {"images": [image.to_doc() for image in images], "refreshed_by": instance_id},
                "$currentDate": {"refreshed_at": True},
            },
            upsert=True,
        )

    @retry_transient
    def load_base_images(self) -> dict[str, Any] | None:
        """The stored list as Ghost reads it (status and tests)."""
        return self.base_images.find_one({"_id": BASE_IMAGES_ID})
