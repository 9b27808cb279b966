"""Which image a name designates (images.py), on image lists as LXD describes them: no LXD needed.

The same rules on the real LXD: test_buildimage.py (base image by fingerprint,
prefix, alias, os/release), test_base_image_pull.py (the pull), test_deploy.py
(the deploy's image), test_retention.py and test_check.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId

from ghost_buildpackd.images import (
    LISTED_BASE_IMAGES,
    BaseImageRefused,
    ImageNotFound,
    base_image,
    build_order,
    is_job_alias,
    keeps_newer_build,
    listed_base_images,
    local_base_image,
    named_image,
    named_images,
    selectable_base_images,
)
from ghost_buildpackd.lxd import IMAGE_PROP_JOB, ImageInfo


def image(fingerprint: str, *aliases: str, created_at: str = "2026-01-01", **properties: str) -> ImageInfo:
    return ImageInfo(fingerprint.ljust(64, "0"), aliases, properties, size=1, created_at=created_at)


DEBIAN_OLD = image("aaaa11", "debian-old", os="Debian", release="bookworm", created_at="2026-01-01")
DEBIAN_NEW = image("aaaa22", "debian-new", os="debian", release="Bookworm", created_at="2026-02-01")
PUBLISHED = image(
    "bbbb33", "0123456789abcdef01234567", os="debian", release="bookworm", created_at="2026-03-01",
    **{IMAGE_PROP_JOB: "0123456789abcdef01234567"},
)  # fmt: skip
IMAGES = [DEBIAN_OLD, DEBIAN_NEW, PUBLISHED]


def test_an_alias_wins_over_a_fingerprint_prefix() -> None:
    aliased_like_a_prefix = image("cccc44", "aaaa22")
    assert named_images("aaaa22", [*IMAGES, aliased_like_a_prefix]) == [aliased_like_a_prefix]


def test_a_fingerprint_prefix_needs_six_hex_digits_and_ignores_case() -> None:
    assert named_image("AAAA22", IMAGES) is DEBIAN_NEW
    assert named_image(DEBIAN_NEW.fingerprint, IMAGES) is DEBIAN_NEW
    assert named_images("aaaa2", IMAGES) == []  # five digits name nothing
    assert named_images("aaaa2z", IMAGES) == []


def test_an_ambiguous_prefix_names_no_image_and_a_build_refuses_it() -> None:
    assert len(named_images("aaaa", IMAGES)) == 0
    assert len(named_images("aaaa00", [image("aaaa00"), image("aaaa001")])) == 2
    assert named_image("aaaa00", [image("aaaa00"), image("aaaa001")]) is None
    with pytest.raises(ImageNotFound, match="image prefix 'aaaa00' is ambiguous"):
        local_base_image("aaaa00", [image("aaaa00"), image("aaaa001")])


def test_os_release_takes_the_newest_image_the_daemon_did_not_publish() -> None:
    assert local_base_image("debian/bookworm", IMAGES) is DEBIAN_NEW
    assert local_base_image("debian/trixie", IMAGES) is None
    assert local_base_image("no-such-alias", IMAGES) is None
    assert named_image("debian/bookworm", IMAGES) is None  # retention and deploys never read os/release


def test_job_aliases_are_job_ids() -> None:
    assert is_job_alias("0123456789abcdef01234567")
    assert not is_job_alias("0123456789abcdef0123456")
    assert not is_job_alias("ghost-buildpackd/busybox")


def test_ghosts_ui_is_offered_every_image_but_the_daemons_builds() -> None:
    described = image("dddd44", "base-a", "base-b", description="Debian bookworm", os="debian", release="bookworm")
    bare = image("eeee55")  # no alias, no properties: Ghost 19.08 listed it too
    offered = selectable_base_images([*IMAGES, described, bare])
    assert [choice.fingerprint for choice in offered] == [  # by description (none: ""), then fingerprint
        DEBIAN_OLD.fingerprint,
        DEBIAN_NEW.fingerprint,
        bare.fingerprint,
        described.fingerprint,
    ]
    assert PUBLISHED.fingerprint not in {choice.fingerprint for choice in offered}
    first = offered[-1]
    assert (first.aliases, first.description, first.os, first.release) == (
        ("base-a", "base-b"),
        "Debian bookworm",
        "debian",
        "bookworm",
    )
    assert offered[2].to_doc() == {
        "fingerprint": bare.fingerprint,
        "aliases": [],
        "description": None,
        "os": None,
        "release": None,
    }


def test_an_image_the_daemon_published_is_never_a_base_image() -> None:
    for ref in ("0123456789abcdef01234567", "bbbb33", PUBLISHED.fingerprint, PUBLISHED.fingerprint.upper()):
        with pytest.raises(BaseImageRefused, match="never a base image") as refused:
            local_base_image(ref, IMAGES)
        assert "0123456789abcdef01234567" in str(refused.value), "the message names the build it is"
    assert local_base_image("debian-new", IMAGES) is DEBIAN_NEW  # the other images still are


class PullingLxd:
    """The two calls `base_image` makes, answering as an image server holding another daemon's build would."""

    def list_images(self) -> list:
        return []

    def pull_image(self, server: str, key: str, ref: str):
        return PUBLISHED


def test_a_pulled_image_the_daemon_published_is_refused_too() -> None:
    with pytest.raises(BaseImageRefused, match="never a base image"):
        base_image(PullingLxd(), "0123456789abcdef01234567", "https://images.example:8443")  # type: ignore[arg-type]


def test_builds_are_ordered_as_ghost_made_their_jobs() -> None:
    second = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    first_id, second_id = ObjectId("6650f00000000000000000aa"), ObjectId("6650f00000000000000000bb")
    older = build_order(first_id, {"_created": second})
    newer = build_order(second_id, {"_created": second})  # Eve stamps to the second: the id breaks the tie
    assert older < newer
    # `_created` wins over the id: a job made a second later with a smaller id is still newer.
    assert build_order(first_id, {"_created": second + timedelta(seconds=1)}) > newer
    assert build_order(first_id, {"_created": second.replace(tzinfo=None)}) == older  # a naive read is UTC
    gone = build_order(second_id, None)  # a job deleted since: the second its ObjectId carries
    assert gone.created == second_id.generation_time
    assert keeps_newer_build(older, newer)
    assert not keeps_newer_build(newer, older)
    assert not keeps_newer_build(newer, None)  # the app names no job's build: the build replaces it


def test_an_unknown_base_image_is_answered_with_a_few_local_bases_and_a_count_of_the_rest() -> None:
    unnamed = [image(f"ffff{n:02d}", created_at=f"2026-04-{n:02d}") for n in range(1, 31)]  # newer than the named

    listed = listed_base_images([*IMAGES, *unnamed])

    assert listed.startswith(DEBIAN_NEW.describe() + "; " + DEBIAN_OLD.describe())  # those with a name first
    assert listed.endswith(f"; and {len(unnamed) + 2 - LISTED_BASE_IMAGES} more (lxc image list)")
    assert listed.count("ffff") == LISTED_BASE_IMAGES - 2  # the newest of the unnamed fill the rest
    assert PUBLISHED.fingerprint[:12] not in listed  # never a base: not offered
    assert listed_base_images([PUBLISHED]) == "none"
