"""Ghost's documents (jobs, apps) as validated records, and the rules Ghost uses.

Pure: no I/O except resolving a working copy path on the local disk. Anything
malformed raises `BadDocument` naming the field and the reason, so the step it
belongs to can fail with a message a person can act on. Reading one field is in
fields.py (with `BadDocument`), module scripts in scripts.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from bson import ObjectId

from ..model import BUILDIMAGE
from .fields import (
    BadDocument,
    list_field,
    mapping_field,
    parse_object_id,
    segment_field,
    short_repr,
    text_field,
    validate_module_path,
)
from .scripts import ModuleScript, choose_module_script, decode_script

_AMI_IN_MESSAGE = re.compile(r"\[(ami-[0-9a-f]+)\]")
# How Ghost's buildimage ends when only the autoscaling group update failed, after the AMI was recorded.
ASG_UPDATE_FAILED = "Autoscaling group update failed"
MAX_ENV_VAR_BYTES = 128 << 10  # Linux MAX_ARG_STRLEN: one `NAME=value` string given to execve
PROVISIONERS = ("salt", "ansible")
# What `build_infos.source_container_image` holds when an app uses no container: Ghost's UI writes '' for
# "Don't use containers" and the text 'None' whenever its selector was not drawn (WTForms 2.2.1 coerces a
# missing SelectField with text_type); apps made through the API may lack the key.
NO_SOURCE_IMAGE = ("", "None")


def built_image(status: Any, message: Any) -> bool:
    """Whether a buildimage job in this state built and recorded its AMI: `done`, or `failed` only at the
    autoscaling group update that comes after (Ghost's own container build ran for those too)."""
    return status == "done" or (status == "failed" and str(message or "").startswith(ASG_UPDATE_FAILED))


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    version: str
    provisioner: str


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: str
    git_repo: str  # after Ghost's normalisation: `git_repo`, else `source.url`
    where: str  # the module's place in the app document, e.g. app.modules[0]
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    def has_script(self, script_name: str) -> bool:
        """Whether Ghost runs `script_name` for this module: `script_name in module`, as Ghost tests it, so an
        empty stored script counts (a file of that name committed in the clone then runs instead)."""
        return script_name in self.raw

    def check_stored_script(self, script_name: str) -> None:
        """BadDocument when the stored script cannot be decoded (checked before the clone exists)."""
        decode_script(self.raw.get(script_name), f"{self.where}.{script_name}")

    def script(self, working_copy: Path, script_name: str) -> ModuleScript:
        """The module script (`build_pack`, `after_all_deploy`) Ghost would run: see choose_module_script.
        Stored scripts stay undecoded until then: a file of the clone may replace them."""
        return choose_module_script(working_copy, script_name, self.raw.get(script_name), f"{self.where}.{script_name}")


@dataclasses.dataclass(frozen=True)
class AssumedRole:
    account_id: str
    role_name: str
    region: str  # where STS is asked; "" for the caller's region

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:role/{self.role_name}"


@dataclasses.dataclass(frozen=True)
class App:
    id: ObjectId
    name: str
    env: str
    role: str
    region: str
    color: str  # "" without blue/green
    is_online: bool
    ami: str
    ami_name: str
    source_container_image: str
    container_image: str
    env_vars: tuple[tuple[str, str], ...]
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def identity(self) -> str:
        """Ghost's AMI name prefix for the app: `ami.{env}.{region}.{role}.{name}[.{color}]`."""
        base = f"ami.{self.env}.{self.region}.{self.role}.{self.name}"
        return f"{base}.{self.color}" if self.color else base

    @property
    def label(self) -> str:
        return f"{self.name}/{self.env}/{self.role}" + (f"/{self.color}" if self.color else "")

    @property
    def secret_values(self) -> list[str]:
        return [value for _, value in self.env_vars if value]

    def hook_env(self) -> dict[str, str]:
        """What Ghost's image builder gives hooks (`ImageBuilder._get_ghost_env_vars`): GHOST_APP,
        GHOST_ENV, GHOST_ENV_COLOR (always, "" without a colour), GHOST_ROLE, then every env_vars entry."""
        env = {"GHOST_APP": self.name, "GHOST_ENV": self.env, "GHOST_ENV_COLOR": self.color, "GHOST_ROLE": self.role}
        env.update(dict(self.env_vars))
        return env

    def module_env(self, module: Module) -> dict[str, str]:
        """What Ghost gives a module script (`get_ghost_env_variables(app, module)`): GHOST_APP, GHOST_ENV,
        GHOST_ROLE, with a colour GHOST_ENV_COLOR and GHOST_ACTIVE_COLOR, the GHOST_MODULE_* three, then
        every env_vars entry with its non-ASCII characters dropped (Ghost encodes them to ASCII, ignoring errors).
        """
        env = {"GHOST_APP": self.name, "GHOST_ENV": self.env, "GHOST_ROLE": self.role}
        if self.color:
            inverted = {"blue": "green", "green": "blue"}
            env["GHOST_ENV_COLOR"] = self.color
            env["GHOST_ACTIVE_COLOR"] = self.color if self.is_online else inverted.get(self.color, self.color)
        env.update(
            GHOST_MODULE_NAME=module.name,
            GHOST_MODULE_PATH=module.path,
            GHOST_MODULE_REPO=module.git_repo.strip(),
        )
        env.update({key: ascii_only(value) for key, value in self.env_vars})
        return env

    @property
    def non_ascii_env_keys(self) -> list[str]:
        """env_vars whose value loses characters in a module script's environment (names only: values may be secret)."""
        return [key for key, value in self.env_vars if not value.isascii()]

    @property
    def assumed_role(self) -> AssumedRole | None:
        """The AWS role Ghost assumes for this app's AWS calls (`get_aws_connection_data`): only when
        both `assumed_account_id` and `assumed_role_name` are set."""
        account = text_field(self.raw, "assumed_account_id", "app", required=False)
        role = text_field(self.raw, "assumed_role_name", "app", required=False)
        if not account or not role:
            return None
        return AssumedRole(account, role, text_field(self.raw, "assumed_region_name", "app", required=False))

    def hook(self, name: str) -> str:
        """Decoded `lifecycle_hooks.<name>` script ("" when absent or empty)."""
        hooks = mapping_field(self.raw.get("lifecycle_hooks"), "app.lifecycle_hooks")
        return decode_script(hooks.get(name), f"app.lifecycle_hooks.{name}")

    def features(self) -> list[Feature]:
        features = []
        for index, item in enumerate(list_field(self.raw.get("features"), "app.features")):
            where = f"app.features[{index}]"
            item = mapping_field(item, where)
            provisioner = item.get("provisioner") or "salt"
            if provisioner not in PROVISIONERS:
                raise BadDocument(f"{where}.provisioner", f"expected salt or ansible, got {short_repr(provisioner)}")
            features.append(Feature(text_field(item, "name", where), str(item.get("version") or ""), provisioner))
        return features

    def provisioners(self) -> list[str]:
        """Provisioners the app's features use, in a stable order."""
        used = {feature.provisioner for feature in self.features()}
        return [name for name in PROVISIONERS if name in used]

    def module(self, name: str) -> Module:
        """The app module called `name`, validated; BadDocument when absent or malformed."""
        for index, item in enumerate(list_field(self.raw.get("modules"), "app.modules")):
            if isinstance(item, Mapping) and item.get("name") == name:
                return _parse_module(item, f"app.modules[{index}]")
        raise BadDocument("app.modules", f"the app has no module named {short_repr(name)}")

    def module_names_with_build_pack(self) -> set[str]:
        """Names of app modules Ghost runs a build_pack for: the key is there, even empty (`has_script`)."""
        names = set()
        for item in list_field(self.raw.get("modules"), "app.modules"):
            if isinstance(item, Mapping) and "build_pack" in item and isinstance(item.get("name"), str):
                names.add(item["name"])
        return names

    def app_dir(self, root: Path) -> Path:
        """`{root}/{name}/{env}/{role}[/{color}]`: where Ghost keeps this app's files."""
        path = root / self.name / self.env / self.role
        return path / self.color if self.color else path

    def working_copy(self, root: Path, module: Module) -> Path:
        """The module's working copy on this host, checked to be a directory inside `root`."""
        path = self.app_dir(root) / module.name
        if not path.exists():
            raise BadDocument("working copy", f"{path} does not exist (has Ghost cloned the module yet?)")
        if not path.is_dir():
            raise BadDocument("working copy", f"{path} is not a directory")
        resolved, resolved_root = path.resolve(), root.resolve()
        if resolved_root not in resolved.parents:
            raise BadDocument("working copy", f"{path} resolves to {resolved}, outside {resolved_root}")
        return resolved


def ascii_only(text: str) -> str:
    """`text` without its non-ASCII characters, as Python 2's `encode('ascii', 'ignore')` gives it."""
    return text.encode("ascii", "ignore").decode("ascii")


def _parse_module(doc: Mapping[str, Any], where: str) -> Module:
    return Module(
        name=segment_field(doc, "name", where),
        path=validate_module_path(doc.get("path"), f"{where}.path"),
        git_repo=_module_repo(doc, where),
        where=where,
        raw=doc,
    )


def _module_repo(doc: Mapping[str, Any], where: str) -> str:
    """Ghost's normalisation of a module (`ghost_data.py`): `git_repo`, else `source.url`."""
    git_repo = text_field(doc, "git_repo", where, required=False)
    if git_repo:
        return git_repo
    source = mapping_field(doc.get("source"), f"{where}.source")
    return text_field(source, "url", f"{where}.source", required=False)


def _env_vars(value: Any) -> tuple[tuple[str, str], ...]:
    pairs = []
    for index, item in enumerate(list_field(value, "app.env_vars")):
        where = f"app.env_vars[{index}]"
        item = mapping_field(item, where)
        key = text_field(item, "var_key", where)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise BadDocument(f"{where}.var_key", f"not a valid environment variable name: {short_repr(key)}")
        raw_value = item.get("var_value")
        if raw_value is not None and not isinstance(raw_value, str | int | float):
            # The value itself is never shown: it may be a secret.
            raise BadDocument(f"{where}.var_value", f"expected a string, got {type(raw_value).__name__}")
        value = "" if raw_value is None else str(raw_value)
        size = len(f"{key}={value}".encode())
        if size >= MAX_ENV_VAR_BYTES:
            # The value itself is never shown: it may be a secret.
            raise BadDocument(
                f"{where}.var_value",
                f"{size} bytes with its name; the kernel refuses an environment variable of {MAX_ENV_VAR_BYTES} "
                "bytes or more (limit of execve)",
            )
        pairs.append((key, value))
    return tuple(pairs)


def parse_app(doc: Mapping[str, Any] | None, app_id: Any = None) -> App:
    """Validate the parts of an app every step needs; modules, hooks and features are checked on use."""
    if doc is None:
        raise BadDocument("job.app_id", f"no app with _id {app_id}")
    build_infos = mapping_field(doc.get("build_infos"), "app.build_infos")
    blue_green = mapping_field(doc.get("blue_green"), "app.blue_green")
    color = segment_field(blue_green, "color", "app.blue_green", required=False)
    return App(
        id=parse_object_id(doc.get("_id"), "app._id"),
        name=segment_field(doc, "name", "app"),
        env=segment_field(doc, "env", "app"),
        role=segment_field(doc, "role", "app"),
        region=text_field(doc, "region", "app", required=False),
        color=color,
        is_online=bool(blue_green.get("is_online", False)),
        ami=text_field(doc, "ami", "app", required=False),
        ami_name=text_field(build_infos, "ami_name", "app.build_infos", required=False),
        source_container_image=_source_image(build_infos),
        container_image=text_field(build_infos, "container_image", "app.build_infos", required=False),
        env_vars=_env_vars(doc.get("env_vars")),
        raw=doc,
    )


def _source_image(build_infos: Mapping[str, Any]) -> str:
    """The app's base image, "" when it uses no container (NO_SOURCE_IMAGE, or no key)."""
    value = text_field(build_infos, "source_container_image", "app.build_infos", required=False).strip()
    return "" if value in NO_SOURCE_IMAGE else value


def containers_off(app: App, containers_enabled: bool, kind: str) -> str | None:
    """Why Ghost 19.08 would run none of this app's `kind` step (buildimage, deploy) in a container; None
    when it would. The one rule the daemon and the patched Ghost (libs/deploy.py) share:

    - Ghost's `container.enabled` (config.yml; absent means false), its `lxd_is_available` gate;
    - the app's `build_infos.source_container_image` (see NO_SOURCE_IMAGE);
    - for a deploy, `build_infos.container_image`: until a build made one, Ghost runs the scripts on its host.
    """
    if not containers_enabled:
        return "container.enabled is not true in Ghost's config.yml: container steps are off on this Ghost"
    if not app.source_container_image:
        return (
            "app.build_infos.source_container_image is not set, so container steps are off for this app "
            '("Don\'t use containers", or no container image chosen)'
        )
    if kind != BUILDIMAGE and not app.container_image:
        return (
            "app.build_infos.container_image is not set: no container image was built for this app yet, so Ghost "
            "runs its module scripts on its own host until a buildimage makes one"
        )
    return None


# Ghost's `boolify`: the values it reads as true (a bool is itself).
_GHOST_TRUE = ("TRUE", "True", "true", "1", 1, "Yes", "Y", "YES", "y")


def ghost_boolify(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return value in _GHOST_TRUE


@dataclasses.dataclass(frozen=True)
class Job:
    id: ObjectId
    command: str
    app_id: ObjectId
    status: str
    message: str
    updated: datetime | None
    module_names: tuple[str, ...]
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def built_image(self) -> bool:
        """A buildimage that built and recorded its AMI: `done`, or `failed` only at the autoscaling
        group update that comes after (Ghost's own container build ran for those too)."""
        return self.command == "buildimage" and built_image(self.status, self.message)

    @property
    def skips_salt_bootstrap(self) -> bool:
        """Ghost's image builder: `options[0]`, read by `boolify`, says to skip salt's bootstrap; without
        options it is skipped."""
        options = self.raw.get("options")
        if not isinstance(options, list | str) or not options:
            return True
        return ghost_boolify(options[0])

    @property
    def ami_id(self) -> str:
        """The AMI id from `Build image OK: [ami-...]`, or ""."""
        match = _AMI_IN_MESSAGE.search(self.message)
        return match.group(1) if match else ""


def parse_job(doc: Mapping[str, Any]) -> Job:
    """Validate a job document; modules are only required to be well-formed for deploys."""
    job_id = parse_object_id(doc.get("_id"), "job._id")
    command = text_field(doc, "command", "job")
    modules: list[str] = []
    if command == "deploy":
        for index, item in enumerate(list_field(doc.get("modules"), "job.modules")):
            item = mapping_field(item, f"job.modules[{index}]")
            # A module name becomes a directory name and part of the step id: a segment, bounded.
            modules.append(segment_field(item, "name", f"job.modules[{index}]"))
    updated = doc.get("_updated")
    message = doc.get("message")
    return Job(
        id=job_id,
        command=command,
        app_id=parse_object_id(doc.get("app_id"), "job.app_id"),
        status=text_field(doc, "status", "job"),
        message=message if isinstance(message, str) else "",
        updated=updated if isinstance(updated, datetime) else None,
        module_names=tuple(modules),
        raw=doc,
    )
