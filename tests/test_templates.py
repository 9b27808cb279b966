"""Template containers on the real LXD: made once per image and id mapping, copied, bounded, swept.

Each test publishes an image of its own (a unique property gives it its own
fingerprint), so the templates it sees are its own whatever else runs on this
LXD server; the image and its templates are deleted at the end.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ghost_buildpackd.lxd import TAG_STEP, ContainerSpec, Lxd
from ghost_buildpackd.templates import (
    TAG_TEMPLATE,
    adopt,
    create_container,
    remove_stale_templates,
    remove_templates_of,
    template_name,
)
from tests.conftest import WORKING_COPY_IDS

pytestmark = [pytest.mark.lxd]

MARK = "/template-test-mark"


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **fields: Any) -> None:
            with self._lock:
                self.events.append((event, fields))

        return record

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


class Scene:
    """An image of this test's own, and every container made from it, removed at the end."""

    def __init__(self, lxd: Lxd, base_fingerprint: str):
        self.lxd = lxd
        self.log = RecordingLog()
        self.containers: list[str] = []
        self.images: list[str] = []
        self.image = self.new_image(base_fingerprint)

    def new_image(self, base_fingerprint: str) -> str:
        source = f"gbp-tpltest-{uuid.uuid4().hex[:10]}"
        self.lxd.create_container(ContainerSpec(name=source, image=base_fingerprint, tags={}))
        try:
            self.lxd.start(source)
            self.lxd.execute(source, ["sh", "-c", f"echo {source} > {MARK}"], {}, lambda _: None, 30)
            self.lxd.stop(source)
            image = self.lxd.publish(source, {"description": f"template test {source}"}, "none")
        finally:
            self.lxd.delete_container(source)
        self.images.append(image.fingerprint)
        return image.fingerprint

    def spec(self, image: str | None = None, idmap: tuple[int, int] | None = None) -> ContainerSpec:
        name = f"gbp-tpltest-{uuid.uuid4().hex[:10]}"
        self.containers.append(name)
        tags = {TAG_STEP: f"test:{name}"}
        return ContainerSpec(name=name, image=image or self.image, tags=tags, idmap=idmap, processes=200)

    def templates(self) -> dict[str, str]:
        """Name -> status of the templates of this test's images (complete or not)."""
        return {c.name: c.status for c in self.lxd.list_containers() if c.tags.get(TAG_TEMPLATE) in set(self.images)}

    def cleanup(self) -> None:
        for name in self.containers:
            self.lxd.delete_container(name)
        for fingerprint in self.images:
            remove_templates_of(self.lxd, fingerprint, self.log)
            self.lxd.delete_image(fingerprint)


@pytest.fixture
def scene(lxd: Lxd, base_image: str) -> Iterator[Scene]:
    base = lxd.image_by_alias(base_image)
    assert base is not None
    made = Scene(lxd, base.fingerprint)
    try:
        yield made
    finally:
        made.cleanup()


def output_of(lxd: Lxd, name: str, command: str) -> str:
    chunks: list[bytes] = []
    result = lxd.execute(name, ["sh", "-c", command], {}, chunks.append, 30)
    assert result.ok, result
    return b"".join(chunks).decode()


def test_the_first_container_makes_the_template_and_later_ones_copy_it(scene: Scene, lxd: Lxd) -> None:
    first, second = scene.spec(), scene.spec()

    create_container(lxd, first, 8, scene.log)
    create_container(lxd, second, 8, scene.log)

    template = template_name(first)
    assert scene.templates() == {template: "Stopped"}
    assert [event["template"] for event in scene.log.named("container_template_made")] == [template]
    copied = scene.log.named("container_copied_from_template")
    assert [(event["container"], event["template"]) for event in copied] == [
        (first.name, template),
        (second.name, template),
    ]
    details = lxd.describe_container(second.name)
    assert details is not None
    assert details.config.get(TAG_TEMPLATE) is None  # a copy is no template
    assert details.config[TAG_STEP] == second.tags[TAG_STEP] and details.config["limits.processes"] == "200"
    lxd.start(second.name)
    assert output_of(lxd, second.name, f"cat {MARK}").strip().startswith("gbp-tpltest-")  # the image's content


def test_each_id_mapping_has_its_own_template(scene: Scene, lxd: Lxd) -> None:
    default, mapped = scene.spec(), scene.spec(idmap=WORKING_COPY_IDS)

    create_container(lxd, default, 8, scene.log)
    create_container(lxd, mapped, 8, scene.log)

    assert template_name(default) != template_name(mapped)
    assert set(scene.templates()) == {template_name(default), template_name(mapped)}
    lxd.start(mapped.name)
    # Container root is the working copy's owner on the host: files root makes there are the owner's.
    assert output_of(lxd, mapped.name, "id -u; stat -c %u /bin").split() == ["0", "0"]


def test_concurrent_first_uses_make_one_template(scene: Scene, lxd: Lxd) -> None:
    specs = [scene.spec() for _ in range(3)]
    errors: list[BaseException] = []

    def create(spec: ContainerSpec) -> None:
        try:
            create_container(lxd, spec, 8, scene.log)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=create, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert len(scene.log.named("container_template_made")) == 1
    assert len(scene.log.named("container_copied_from_template")) == 3
    assert all(lxd.container_status(spec.name) == "Stopped" for spec in specs)


def test_no_templates_when_the_setting_is_zero(scene: Scene, lxd: Lxd) -> None:
    spec = scene.spec()

    create_container(lxd, spec, 0, scene.log)

    assert lxd.container_status(spec.name) == "Stopped"
    assert scene.templates() == {}
    assert scene.log.events == []


def test_least_recently_used_templates_go_beyond_the_bound(scene: Scene, lxd: Lxd) -> None:
    second_image, third_image = scene.new_image(scene.image), scene.new_image(scene.image)
    used_again, unused = scene.spec(), scene.spec(image=second_image)
    create_container(lxd, used_again, 8, scene.log)
    create_container(lxd, unused, 8, scene.log)
    create_container(lxd, scene.spec(), 8, scene.log)  # the first template is now the most recently used
    newest = scene.spec(image=third_image)

    create_container(lxd, newest, 2, scene.log)  # a new template beyond the bound of two

    assert scene.templates() == {template_name(used_again): "Stopped", template_name(newest): "Stopped"}
    ours = {template_name(used_again), template_name(unused), template_name(newest)}  # the bound counts them all
    removed = [(e["template"], e["reason"]) for e in scene.log.named("container_template_removed")]
    assert [item for item in removed if item[0] in ours] == [(template_name(unused), "over container.templates")]


def test_an_unusable_template_falls_back_to_the_image(scene: Scene, lxd: Lxd) -> None:
    spec = scene.spec()
    create_container(lxd, spec, 8, scene.log)
    template = template_name(spec)
    lxd.start(template)  # a template somebody started by hand is not copied
    try:
        fallback = scene.spec()
        create_container(lxd, fallback, 8, scene.log)
    finally:
        lxd.stop(template)

    assert lxd.container_status(fallback.name) == "Stopped"
    unusable = scene.log.named("container_template_unusable")
    assert [event["container"] for event in unusable] == [fallback.name]
    assert set(scene.templates()) == {template}  # the temporary one was removed


def test_the_sweep_removes_templates_of_deleted_images_and_half_made_ones(scene: Scene, lxd: Lxd) -> None:
    gone_image = scene.new_image(scene.image)
    kept, gone = scene.spec(), scene.spec(image=gone_image)
    create_container(lxd, kept, 8, scene.log)
    create_container(lxd, gone, 8, scene.log)
    half_made = f"{template_name(kept)}-abc123"
    lxd.create_container(ContainerSpec(name=half_made, image=scene.image, tags={TAG_TEMPLATE: scene.image}))
    scene.containers.append(half_made)
    lxd.delete_image(gone_image)

    ours = {template_name(kept), template_name(gone), half_made}  # other tests' stale templates may go too

    now_removed = remove_stale_templates(lxd, scene.log)
    later_removed = remove_stale_templates(lxd, scene.log, now=datetime.now(UTC) + timedelta(minutes=11))

    assert ours.intersection(now_removed) == {template_name(gone)}  # a temporary one of seconds may be in the making
    assert ours.intersection(later_removed) == {half_made}
    assert scene.templates() == {template_name(kept): "Stopped"}


def test_a_stopped_container_is_adopted_as_template_unless_one_exists(scene: Scene, lxd: Lxd) -> None:
    first, second = scene.spec(idmap=WORKING_COPY_IDS), scene.spec(idmap=WORKING_COPY_IDS)
    lxd.create_container(first)
    lxd.create_container(second)

    assert adopt(lxd, first.name, first, 8, scene.log) is True
    assert adopt(lxd, second.name, second, 8, scene.log) is False  # the first one is the template now

    template = template_name(first)
    assert scene.templates() == {template: "Stopped"}
    assert lxd.container_status(first.name) is None and lxd.container_status(second.name) == "Stopped"
    details = lxd.describe_container(template)
    assert details is not None and TAG_STEP not in details.config  # no step may claim it as its container
    create_container(lxd, scene.spec(idmap=WORKING_COPY_IDS), 8, scene.log)
    assert [event["template"] for event in scene.log.named("container_copied_from_template")] == [template]
    assert scene.log.named("container_template_made") == []
