"""Which LXD image wins: the image policy of builds, deploys, retention and `check`, apart from the LXD calls.

- A build starts from the app's base image (`build_infos.source_container_image`):
  the image of that alias, else of that fingerprint or unique fingerprint prefix
  (6 hex digits or more), else the newest `os/release` image the daemon did not
  publish itself. With `lxd.image_server` set (Ghost's `container.endpoint`, a
  remote LXD), a reference no local image matches is pulled from there, as Ghost
  did: by fingerprint (what Ghost's UI stores), else by alias. An image the
  daemon published (an app's build, this app's included) is never a base: a
  reference naming one is refused (`BaseImageRefused`), so one app's hooks never
  run on what another app's hooks baked in.
- A deploy runs the app's last built image, `build_infos.container_image` (the
  alias of its buildimage job), and no other. Which build is the last is Ghost's
  job order (`BuildOrder`: Eve's `_created`, then the job id), not the order in
  which builds finish: a build whose job is older than the one the app names
  publishes its image but leaves the app as it is (`keeps_newer_build`).
- Retention and `check` read image names with the same rules (`named_image`,
  `local_base_image`); the images the daemon publishes are aliased by their job
  id (`is_job_alias`).
- Ghost's UI offers as base images every image but those the daemon published
  (`selectable_base_images`): the daemon keeps that list in MongoDB for it.

`lxd/` only carries out the calls (list, get by alias or fingerprint, pull).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from .lxd import IMAGE_PROP_JOB, ImageInfo, ImagePullFailed, Lxd, LxdError
from .store import BaseImage

MIN_PREFIX = 6  # hex digits of a fingerprint prefix that may name an image
MIN_PULL_FINGERPRINT = 12  # a shorter hex reference is pulled as an alias
JOB_ALIAS = re.compile(r"[0-9a-f]{24}")  # the aliases of images the daemon published are job ids


class ImageNotFound(LxdError):
    """No image is the one asked for; the text says what was looked for and what exists."""


class BaseImageRefused(ImageNotFound):
    """The reference names an image no build may start from: one the daemon published."""


@dataclasses.dataclass(frozen=True, order=True)
class BuildOrder:
    """Where a buildimage job stands in Ghost's job order: Eve's `_created` (to the second), then the job id.

    Eve stamps `_created` once, at the job's insert, truncated to the second, so
    jobs made in the same second are told apart by their ObjectId.
    """

    created: datetime
    job_id: ObjectId


def build_order(job_id: ObjectId, job: Mapping[str, Any] | None) -> BuildOrder:
    """The order of job `job_id` from its document; without a date there (a job deleted since, or written
    by hand), the creation second its ObjectId carries, which is when Eve inserted it."""
    created = (job or {}).get("_created")
    if not isinstance(created, datetime):
        created = job_id.generation_time
    elif created.tzinfo is None:  # a client that is not tz-aware reads naive UTC
        created = created.replace(tzinfo=UTC)
    return BuildOrder(created, job_id)


def keeps_newer_build(mine: BuildOrder, current: BuildOrder | None) -> bool:
    """Whether the app must keep the image it names (`current`, None when it names no build of a job) rather
    than take the image of build `mine`: it does when its job comes later in Ghost's order."""
    return current is not None and current > mine


def is_job_alias(alias: str) -> bool:
    """Whether `alias` is one the daemon gives the images it publishes (a job id)."""
    return JOB_ALIAS.fullmatch(alias) is not None


def published_by_daemon(image: ImageInfo) -> bool:
    """Whether the daemon published `image` (an app's build): never another app's base image."""
    return IMAGE_PROP_JOB in image.properties


def selectable_base_images(images: Sequence[ImageInfo]) -> list[BaseImage]:
    """The images Ghost's UI may offer as an app's base image, by description then fingerprint."""
    found = [
        BaseImage(
            fingerprint=image.fingerprint,
            aliases=image.aliases,
            description=image.properties.get("description"),
            os=image.properties.get("os"),
            release=image.properties.get("release"),
        )
        for image in images
        if not published_by_daemon(image)
    ]
    return sorted(found, key=lambda image: (image.description or "", image.fingerprint))


def _is_hex(text: str) -> bool:
    """Whether `text` can be (a prefix of) an image fingerprint."""
    return all(c in "0123456789abcdef" for c in text.lower())


def named_images(name: str, images: Sequence[ImageInfo]) -> list[ImageInfo]:
    """The images `name` designates: the one it is an alias of, else those whose fingerprint starts with it."""
    by_alias = [image for image in images if name in image.aliases]
    if by_alias or len(name) < MIN_PREFIX or not _is_hex(name):
        return by_alias
    return [image for image in images if image.fingerprint.startswith(name.lower())]


def named_image(name: str, images: Sequence[ImageInfo]) -> ImageInfo | None:
    """The image `name` designates by alias or fingerprint (prefix); None when none does or the prefix is ambiguous."""
    matches = named_images(name, images)
    return matches[0] if len(matches) == 1 else None


def local_base_image(ref: str, images: Sequence[ImageInfo]) -> ImageInfo | None:
    """Which of `images` a build on base image `ref` starts from; None when none matches.

    ImageNotFound when `ref` is a fingerprint prefix several images share.
    """
    matches = named_images(ref, images)
    if len(matches) > 1:
        raise ImageNotFound(f"image prefix {ref!r} is ambiguous: {', '.join(m.describe() for m in matches)}")
    if matches:
        return usable_as_base(ref, matches[0])
    if "/" not in ref:
        return None
    os_name, _, release = ref.partition("/")
    same_release = [
        image
        for image in images
        if image.properties.get("os", "").lower() == os_name.lower()
        and image.properties.get("release", "").lower() == release.lower()
        and not published_by_daemon(image)
    ]
    return max(same_release, key=lambda image: image.created_at) if same_release else None


def base_image(lxd: Lxd, ref: str, image_server: str | None) -> ImageInfo:
    """The image a build on base image `ref` starts from, pulled from `image_server` when none is local."""
    ref = ref.strip()
    images = lxd.list_images()
    local = local_base_image(ref, images)
    if local is not None:
        return local
    if image_server:
        return usable_as_base(ref, pull_base_image(lxd, ref, image_server))
    raise ImageNotFound(
        f"no LXD image matches {ref!r} as an alias, a fingerprint or an os/release; "
        f"local base images: {listed_base_images(images)}"
    )


LISTED_BASE_IMAGES = 10  # a host may hold hundreds of images: the message names a few and counts the rest


def listed_base_images(images: Sequence[ImageInfo]) -> str:
    """The local images a build may start from, as a message lists them: those with an alias (a name to give
    Ghost's UI) first, newest first, at most a few."""
    bases = sorted(
        (image for image in images if not published_by_daemon(image)),
        key=lambda image: (bool(image.aliases), image.created_at),
        reverse=True,
    )
    if not bases:
        return "none"
    named = "; ".join(image.describe() for image in bases[:LISTED_BASE_IMAGES])
    more = len(bases) - LISTED_BASE_IMAGES
    return f"{named}; and {more} more (lxc image list)" if more > 0 else named


def usable_as_base(ref: str, image: ImageInfo) -> ImageInfo:
    """`image`, unless the daemon published it: then BaseImageRefused, saying which build it is and why."""
    if not published_by_daemon(image):
        return image
    raise BaseImageRefused(
        f"{ref!r} names {image.describe()}, an image ghost-buildpackd published for the buildimage job "
        f"{image.properties.get(IMAGE_PROP_JOB)} (app {image.properties.get('ghost.app', 'unknown')}): the images "
        "the daemon publishes are never a base image, or one app's build would run on what another build's hooks "
        "and features left in it; choose a base image in Ghost's UI (it lists only those that may be)"
    )


def pull_base_image(lxd: Lxd, ref: str, server: str) -> ImageInfo:
    """Copy `ref` from `server`; ImageNotFound naming the server and the reference when it fails."""
    key = "fingerprint" if len(ref) >= MIN_PULL_FINGERPRINT and _is_hex(ref) else "alias"
    try:
        return lxd.pull_image(server, key, ref)
    except ImagePullFailed as error:
        raise ImageNotFound(
            f"no local LXD image matches {ref!r}, and pulling {key} {ref} from {server} "
            f"(lxd.image_server, else Ghost's container.endpoint) over LXD's protocol failed: {error}"
        ) from error


def deploy_image(lxd: Lxd, alias: str | None) -> ImageInfo:
    """The image a deploy runs: the app's `build_infos.container_image`; ImageNotFound saying why there is none."""
    if not alias:
        raise ImageNotFound(
            "app.build_infos.container_image is not set: no container image was built for this app yet "
            "(run a buildimage first)"
        )
    image = lxd.image_by_alias(alias)
    if image is None:
        raise ImageNotFound(
            f"app.build_infos.container_image: LXD image {alias!r} does not exist on this host "
            "(deleted, or built on another host); run a buildimage again"
        )
    return image
