"""Template containers on the real LXD: made once per image and id mapping, copied, bounded, swept.

Each test publishes an image of its own (a unique property gives it its own
fingerprint), so the templates it sees are its own whatever else runs on this
LXD server; the image and its templates are deleted at the end.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ghost_buildpackd.config import Config
from ghost_buildpackd.lxd import TAG_STEP, ContainerInfo, ContainerSpec, Lxd
from ghost_buildpackd.status import show_status
from ghost_buildpackd.upkeep.templates import (
    TAG_COPY,
    TAG_DELETING,
    TAG_TEMPLATE,
    adopt,
    create_container,
    evict_templates,
    make_wanted_templates,
    remove_stale_templates,
    remove_templates_of,
    template_name,
)
from tests.conftest import WORKING_COPY_IDS
from tests.support.waiting import wait_until

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


class ScopedLxd(Lxd):
    """This LXD, listing only the containers of the test's own images (eviction counts every template on the
    server, and other tests' templates are not this test's to evict)."""

    def __init__(self, lxd: Lxd, scene: Scene):
        super().__init__(lxd.config)
        self.scene = scene

    def list_containers(self) -> list[ContainerInfo]:
        images = set(self.scene.images)
        return [c for c in super().list_containers() if c.tags.get(TAG_TEMPLATE) in images]


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


def test_a_first_use_asking_for_the_template_later_is_made_from_the_image_and_the_template_after(
    scene: Scene, lxd: Lxd
) -> None:
    first, second = scene.spec(), scene.spec()
    template = template_name(first)

    create_container(lxd, first, 8, scene.log, template_later=True)
    assert lxd.container_status(first.name) == "Stopped" and scene.templates() == {}  # no template on its path
    assert [e["template_later"] for e in scene.log.named("container_made_from_image")] == [template]
    lxd.start(first.name)
    assert output_of(lxd, first.name, f"cat {MARK}").strip().startswith("gbp-tpltest-")  # the image's content

    assert make_wanted_templates(ScopedLxd(lxd, scene), 8, scene.log) == [template]  # the upkeep loop's turn
    assert scene.templates() == {template: "Stopped"}
    assert make_wanted_templates(lxd, 8, scene.log) == []  # asked once, made once

    create_container(lxd, second, 8, scene.log, template_later=True)
    assert [e["container"] for e in scene.log.named("container_copied_from_template")] == [second.name]


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
    scoped = ScopedLxd(lxd, scene)  # the bound counts every template on the server: other tests' run alongside
    second_image, third_image = scene.new_image(scene.image), scene.new_image(scene.image)
    used_again, unused = scene.spec(), scene.spec(image=second_image)
    create_container(scoped, used_again, 8, scene.log)
    create_container(scoped, unused, 8, scene.log)
    create_container(scoped, scene.spec(), 8, scene.log)  # the first template is now the most recently used
    newest = scene.spec(image=third_image)

    create_container(scoped, newest, 2, scene.log)  # a new template beyond the bound of two

    assert scene.templates() == {template_name(used_again): "Stopped", template_name(newest): "Stopped"}
    removed = [(e["template"], e["reason"]) for e in scene.log.named("container_template_removed")]
    # Only the least recently used goes: here, or already by another daemon sharing this LXD (its bound counts ours).
    assert removed in ([(template_name(unused), "over container.templates")], [])


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


# --- a template while it is copied (on a `dir` pool, LXD deletes it mid-copy and the copy misses files) ---------

DEBIAN_IMAGE = "ghost-buildpackd/debian-bench"  # thousands of files: a copy on `dir` lasts about a second


@pytest.fixture
def debian_scene(lxd: Lxd) -> Iterator[Scene]:
    """A Scene whose image is a Debian minbase image of its own (the fault needs a copy that takes a while)."""
    debian = lxd.image_by_alias(DEBIAN_IMAGE)
    if debian is None:
        pytest.fail(f"image {DEBIAN_IMAGE!r} is missing: run scripts/build-debian-image")
    made = Scene(lxd, debian.fingerprint)
    try:
        yield made
    finally:
        made.cleanup()


def rootfs(lxd: Lxd, name: str) -> Path:
    """The container's root filesystem on the host; these tests read it on a `dir` pool only."""
    found = lxd.root_pool(("default",))
    if found is None or found[1] != "dir":
        pytest.skip(f"the default profile's pool is not `dir` ({found}): files are not counted on the host")
    source = lxd.client.storage_pools.get(found[0]).config["source"]
    return Path(source) / "containers" / name / "rootfs"


def count_files(lxd: Lxd, name: str) -> int:
    """Files, directories and links under the container's root (its volume must exist)."""
    top = rootfs(lxd, name)
    assert top.is_dir(), f"no root filesystem for {name} at {top}"
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(top))


def copy_while(lxd: Lxd, spec: ContainerSpec, keep: int, log: RecordingLog, fault: Callable[[], Any]) -> Any:
    """Create `spec`'s container (from its template) and run `fault` once the copy writes files; its result."""
    errors: list[BaseException] = []

    def create() -> None:
        try:
            create_container(lxd, spec, keep, log)
        except BaseException as error:  # reported below
            errors.append(error)

    creating = threading.Thread(target=create)
    creating.start()
    target = rootfs(lxd, spec.name)
    wait_until(lambda: target.is_dir() and any(target.iterdir()), 60, f"the copy {spec.name} to write files")
    result = fault()
    creating.join(300)
    assert not creating.is_alive() and errors == []
    return result


class OtherInstance:
    """Another daemon's process on this LXD: it removes the templates of an image (retention does) when told."""

    SCRIPT = (
        "import json, sys\n"
        "from ghost_buildpackd.config import LxdConfig\n"
        "from ghost_buildpackd.lxd import Lxd\n"
        "from ghost_buildpackd.logs import get_logger\n"
        "from ghost_buildpackd.upkeep.templates import remove_templates_of\n"
        "lxd = Lxd(LxdConfig(timeout=60))\n"
        "print('ready', flush=True)\n"
        "fingerprint = sys.stdin.readline().strip()\n"
        "print('removed', json.dumps(remove_templates_of(lxd, fingerprint, get_logger('other'))), flush=True)\n"
    )

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def _answer(self) -> str:
        """Its answer line (its log lines go to the same output)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("removed "):
                return line.removeprefix("removed ")
        raise AssertionError("the other instance ended without answering")

    def remove_templates_of(self, fingerprint: str) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(fingerprint + "\n")
        self.process.stdin.flush()
        removed = json.loads(self._answer())
        assert self.process.wait(60) == 0
        return list(removed)


@pytest.mark.slow
def test_another_instance_cannot_delete_a_template_while_it_is_copied(debian_scene: Scene, lxd: Lxd) -> None:
    scene = debian_scene
    create_container(lxd, scene.spec(), 8, scene.log)  # makes the template
    template = template_name(scene.spec())
    in_template = count_files(lxd, template)
    other = OtherInstance()
    copy = scene.spec()

    # Retention in another daemon deletes the image's templates the moment the copy writes its first files.
    removed_meanwhile = copy_while(lxd, copy, 1, scene.log, lambda: other.remove_templates_of(scene.image))

    in_copy = count_files(lxd, copy.name)
    assert (removed_meanwhile, in_copy) == ([], in_template), (
        f"removed during the copy: {removed_meanwhile}; files: {in_copy} in the copy, {in_template} in the template"
    )
    assert [e["container"] for e in scene.log.named("container_copied_from_template")][-1] == copy.name
    assert remove_templates_of(lxd, scene.image, scene.log) == [template]  # once the copy is done, it goes


@pytest.mark.slow
def test_eviction_passes_over_a_template_in_its_first_copy(debian_scene: Scene, lxd: Lxd) -> None:
    scene = debian_scene
    scoped = ScopedLxd(lxd, scene)
    create_container(scoped, scene.spec(), 8, scene.log)
    copied, newer = template_name(scene.spec()), template_name(scene.spec(idmap=WORKING_COPY_IDS))
    create_container(scoped, scene.spec(idmap=WORKING_COPY_IDS), 8, scene.log)  # a second, newer template
    in_template = count_files(lxd, copied)
    copy = scene.spec()

    # `container.templates: 1`, while the older template is copied: a new template elsewhere evicts beyond it.
    evicted = copy_while(lxd, copy, 1, scene.log, lambda: evict_templates(scoped, 1, scene.log, spare=newer))

    in_copy = count_files(lxd, copy.name)
    assert (evicted, in_copy) == ([], in_template), (
        f"evicted during the copy: {evicted}; files: {in_copy} in the copy, {in_template} in the template"
    )
    assert evict_templates(scoped, 1, scene.log, spare=newer) == [copied]  # copied since: still the older one


def refusal(action: Callable[[], Any]) -> str:
    """The error `action` raised, or "" when it did not."""
    try:
        action()
    except Exception as error:
        return str(error)
    return ""


@pytest.mark.slow
def test_a_template_cannot_be_deleted_by_hand_while_it_is_copied(debian_scene: Scene, lxd: Lxd) -> None:
    scene = debian_scene
    create_container(lxd, scene.spec(), 8, scene.log)
    template = template_name(scene.spec())
    in_template = count_files(lxd, template)
    copy = scene.spec()

    # `lxc delete`, or a daemon of an earlier version, deletes without asking for holds.
    refused = copy_while(lxd, copy, 1, scene.log, lambda: refusal(lambda: lxd.delete_container(template)))

    in_copy = count_files(lxd, copy.name)
    assert ("protected" in refused, in_copy) == (True, in_template), (
        f"deletion: {refused or 'done'}; files: {in_copy} in the copy, {in_template} in the template"
    )
    copied = lxd.describe_container(copy.name)
    assert copied is not None and not copied.config.get("security.protection.delete")  # a copy is deletable


@pytest.mark.slow
def test_a_copy_whose_template_vanished_is_not_used(debian_scene: Scene, lxd: Lxd) -> None:
    scene = debian_scene
    from_image = scene.spec()
    create_container(lxd, from_image, 0, scene.log)
    create_container(lxd, scene.spec(), 8, scene.log)
    template = template_name(scene.spec())
    in_image = count_files(lxd, from_image.name)
    copy = scene.spec()

    def delete_as_a_racing_instance() -> None:
        # What a deletion whose mark was written in the same moment as the copy's hold leaves when the mark is
        # applied last (LXD checks both writes' ETag before applying either): the hold is gone, and it deletes.
        marked = {TAG_DELETING: "1"}
        lxd.change_tags(template, lambda tags: {k: v for k, v in tags.items() if not k.startswith(TAG_COPY)} | marked)
        lxd.delete_container(template, unprotect=True)

    copy_while(lxd, copy, 1, scene.log, delete_as_a_racing_instance)

    assert lxd.container_status(template) is None
    in_copy = count_files(lxd, copy.name)
    assert in_copy == in_image, f"{in_copy} files in the container, {in_image} in one made from the image"
    assert [e["container"] for e in scene.log.named("container_template_unusable")] == [copy.name]


def test_status_lists_templates_as_kept_by_design_and_says_when_lxd_cannot_be_read(
    scene: Scene, lxd: Lxd, make_config: Callable[..., Config]
) -> None:
    spec = scene.spec()
    create_container(lxd, spec, 8, scene.log)
    out = io.StringIO()

    assert show_status(make_config(), out, as_json=True, last=0) == 0

    kept = json.loads(out.getvalue())["kept_by_design"]
    [template] = [t for t in kept["templates"] if t["name"] == template_name(spec)]
    assert (template["image"], template["copies_now"], kept["bound"]) == (scene.image[:12], 0, 8)
    image = lxd.image_by_fingerprint(scene.image)
    assert image is not None and template["image_size"] == image.size
    assert spec.name not in {t["name"] for t in kept["templates"]}  # the copy is not a template
    text = io.StringIO()
    show_status(make_config(), text, as_json=False, last=0)
    assert "Kept by design in LXD" in text.getvalue() and template_name(spec) in text.getvalue()

    away = io.StringIO()
    assert show_status(make_config(lxd={"endpoint": "unix:/nonexistent/lxd.socket"}), away, False, 0) == 0
    assert "LXD not read" in away.getvalue() and "member of the lxd group" in away.getvalue()
