"""The bad-input corpus: malformed Ghost documents, client calls and config files.

Each case must yield a clear message naming the field and the reason, run
nothing (no container is created for its job: the daemon's log and LXD say
so), and leave the daemon up. The Ghost documents all go through one real
daemon process (`ghost-buildpackd run`), which must then still run a good
deploy; client calls and config files are checked where they are refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.config import ConfigError, config_from_mapping, load_config
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import FAILED, SUCCEEDED, Step
from ghost_buildpackd.store import Store
from tests.conftest import BASE_IMAGE, WORKING_COPY_IDS, leftover_containers, raw_config
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.waiting import Timeout, wait_until

HUGE = 10 * 1000 * 1000  # a 10 MB string
SECRET = "corpus-secret-4f9c1d"

# --- Ghost documents ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One malformed Ghost input, how to make it, and the message it must yield."""

    kind: str  # buildimage | deploy | ignored
    expected: tuple[str, ...]  # substrings of the message: the field, then the reason
    app: dict[str, Any] = dataclasses.field(default_factory=dict)  # make_app overrides
    job: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields set on the job
    modules: tuple[str, ...] = ("api",)  # the deploy job's modules
    request: Callable[[Path, Path], None] | None = None  # deploy: Ghost's client asks, after shaping the copy
    where: str = "step"  # step: the step record's message; log: a daemon log line; none: silently ignored


def _api(**changes: Any) -> list[dict[str, Any]]:
    return [{**module_doc("api", "/srv/api", "echo should not run"), **changes}]


def _copy_missing(app_dir: Path, outside: Path) -> None:
    app_dir.mkdir(parents=True)


def _copy_is_a_file(app_dir: Path, outside: Path) -> None:
    app_dir.mkdir(parents=True)
    (app_dir / "api").write_text("not a directory")


def _copy_escapes_root(app_dir: Path, outside: Path) -> None:
    app_dir.mkdir(parents=True)
    os.chown(outside, *WORKING_COPY_IDS)
    (app_dir / "api").symlink_to(outside)


SEGMENT = "must be a single path segment"
CASES: dict[str, Case] = {
    # wrong types
    "app name is a number": Case("buildimage", ("app.name", "expected a string, got int"), app={"name": 12}),
    "env_vars is a string": Case("buildimage", ("app.env_vars", "expected a list, got str"), app={"env_vars": "A=1"}),
    "env var value is an object": Case(
        "buildimage",
        ("app.env_vars[0].var_value", "expected a string, got dict"),
        app={"env_vars": [{"var_key": "TOKEN", "var_value": {"token": SECRET}}]},
    ),
    "env var name invalid": Case(
        "buildimage",
        ("app.env_vars[0].var_key", "not a valid environment variable name"),
        app={"env_vars": [{"var_key": "A-B", "var_value": "x"}]},
    ),
    "build_infos is a string": Case(
        "buildimage", ("app.build_infos", "expected an object, got str"), app={"build_infos": "x"}
    ),
    "lifecycle_hooks is a number": Case(
        "buildimage", ("app.lifecycle_hooks", "expected an object, got int"), app={"lifecycle_hooks": 5}
    ),
    "features is a string": Case("buildimage", ("app.features", "expected a list, got str"), app={"features": "salt"}),
    "unknown provisioner": Case(
        "buildimage",
        ("app.features[0].provisioner", "expected salt or ansible"),
        app={"features": [{"name": "x", "provisioner": "chef"}]},
    ),
    "app modules is an object": Case(
        "deploy", ("app.modules", "expected a list, got dict"), app={"modules": {"api": "x"}}
    ),
    "job modules is a string": Case("deploy", ("job.modules", "expected a list, got str"), job={"modules": "api"}),
    # missing fields and dangling references
    "app without name": Case("buildimage", ("app.name", "missing"), app={"name": None}),
    "app without role": Case("buildimage", ("app.role", "missing"), app={"role": ""}),
    "job app_id unknown": Case("buildimage", ("job.app_id", "no app with _id"), job={"app_id": ObjectId()}),
    "job module unknown to the app": Case(
        "deploy", ("job.modules", "the app has no module named 'ghost'"), modules=("ghost",)
    ),
    "features without provisioner tree": Case(
        "buildimage",
        ("provisioner tree", "does not exist"),
        app={"features": [{"name": "nginx", "provisioner": "salt"}]},
    ),
    "base image unknown": Case(
        "buildimage",
        ("app.build_infos.source_container_image", "no LXD image matches"),
        app={"source_container_image": "no/such-image-corpus"},
    ),
    "container image gone": Case(
        "deploy",
        ("app.build_infos.container_image", "does not exist on this host"),
        app={"container_image": "gone-alias-corpus"},
    ),
    # huge strings
    "10 MB app name": Case(
        "buildimage",
        ("app.name", SEGMENT, f"({HUGE + 2} characters)"),
        app={"name": "a" * HUGE, "build_infos": {"source_container_image": BASE_IMAGE}},
    ),
    "10 MB module name": Case(
        "deploy",
        ("job.modules[0].name", SEGMENT, f"({HUGE + 2} characters)"),
        app={"modules": _api(name="m" * HUGE)},
        modules=("m" * HUGE,),
    ),
    "10 MB env var value": Case(
        "buildimage",
        ("app.env_vars[0].var_value", "bytes", "limit"),
        app={"env_vars": [{"var_key": "BIG", "var_value": "v" * HUGE}]},
    ),
    "hook over 1 MiB": Case(
        "buildimage",
        ("app.lifecycle_hooks.pre_buildimage", "larger than"),
        app={"lifecycle_hooks": {"pre_buildimage": b64("#" * (2 << 20))}},
    ),
    # invalid base64 / encodings
    "pre hook not base64": Case(
        "buildimage",
        ("app.lifecycle_hooks.pre_buildimage", "not valid base64"),
        app={"lifecycle_hooks": {"pre_buildimage": "@@ not base64 @@"}},
    ),
    "post hook not UTF-8": Case(
        "buildimage",
        ("app.lifecycle_hooks.post_buildimage", "not valid UTF-8"),
        app={"lifecycle_hooks": {"post_buildimage": base64.b64encode(b"echo \xff\xfe").decode()}},
    ),
    "build_pack not base64": Case(
        "deploy", ("app.modules[0].build_pack", "not valid base64"), app={"modules": _api(build_pack="%%%YWJjZA")}
    ),
    # path traversal in every field that becomes a path
    "app name ..": Case("buildimage", ("app.name", SEGMENT), app={"name": ".."}),
    "app name with a slash": Case("buildimage", ("app.name", SEGMENT), app={"name": "sh/../op"}),
    "env escaping": Case("buildimage", ("app.env", SEGMENT), app={"env": "../../etc"}),
    "role escaping": Case("buildimage", ("app.role", SEGMENT), app={"role": "web/../../x"}),
    "color escaping": Case("buildimage", ("app.blue_green.color", SEGMENT), app={"color": "../blue"}),
    "module name escaping": Case(
        "deploy",
        ("job.modules[0].name", SEGMENT),
        app={"modules": [module_doc("../api", "/srv/api", "echo should not run")]},
        modules=("../api",),
    ),
    "module path with ..": Case(
        "deploy", ("app.modules[0].path", "must not contain '.' or '..'"), app={"modules": _api(path="/srv/../etc")}
    ),
    "module path relative": Case(
        "deploy", ("app.modules[0].path", "must be absolute"), app={"modules": _api(path="srv/api")}
    ),
    "module path /": Case("deploy", ("app.modules[0].path", "must not be '/'"), app={"modules": _api(path="/")}),
    "working copy symlink escaping ghost.root": Case("deploy", ("working copy", "outside"), request=_copy_escapes_root),
    "working copy missing": Case("deploy", ("working copy", "does not exist"), request=_copy_missing),
    "working copy is a file": Case("deploy", ("working copy", "is not a directory"), request=_copy_is_a_file),
    # ids that are not ObjectIds
    "job app_id not an ObjectId": Case(
        "buildimage", ("job.app_id", "expected an ObjectId"), job={"app_id": "not-an-object-id"}
    ),
    "job _id not an ObjectId": Case(
        "buildimage", ("job._id", "expected an ObjectId"), job={"_id": "job-id-as-text"}, where="log"
    ),
    # commands the daemon does not handle: ignored, nothing run
    "unknown command": Case("ignored", (), job={"command": "rm -rf /"}, where="none"),
    "command is a number": Case("ignored", (), job={"command": 12}, where="none"),
}


def _insert_case(db: Database, index: int, case: Case, root: Path, outside: Path) -> Any:
    """The case's app and job, as Ghost would have written them; returns the job's _id."""
    app_fields = {"name": f"app{index}", "container_image": BASE_IMAGE, "modules": _api(), **case.app}
    app = make_app(db, **app_fields)
    command = "deploy" if case.kind == "deploy" else "buildimage"
    job = make_job(db, app, command=command, modules=list(case.modules))
    fields = dict(case.job)
    if "_id" in fields:  # an _id cannot change: the job is written again under the new one
        doc = db.jobs.find_one_and_delete({"_id": job})
        job = db.jobs.insert_one({**doc, **fields}).inserted_id
    elif fields:
        db.jobs.update_one({"_id": job}, {"$set": fields})
    if case.request is not None:
        # Ghost's client asks before the daemon prepared anything: the checks at run time refuse it.
        case.request(root / f"app{index}" / "prod" / "web", outside)
        Store(db).request_step(job, "api", socket.gethostname(), app)
    if command == "deploy":
        set_status(db, job, "started")
    else:
        finish_buildimage(db, job)
    return job


@dataclasses.dataclass
class CorpusRun:
    daemon: DaemonProcess
    jobs: dict[str, Any]
    steps: dict[str, list[Step]]
    good_result: Any
    containers_left: list[str]
    log_text: str

    def created_containers(self, job: Any) -> bool:
        return bool(self.daemon.saw("container_creating", job_id=str(job)))

    def ran_commands(self, job: Any) -> bool:
        return bool(self.daemon.saw("command_started", job_id=str(job)))


@pytest.fixture(scope="module")
def corpus(
    replica_set_mongo, lxd: Lxd, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CorpusRun]:
    """Every case through one daemon process, then a good deploy through Ghost's client."""
    base = tmp_path_factory.mktemp("bad_input")
    dirs = {name: base / name for name in ("root", "log_dir", "provisioner_tree")}
    for path in (*dirs.values(), base / "outside"):
        path.mkdir()
    for path in (base, *base.parents):
        if path != Path("/"):
            path.chmod(path.stat().st_mode | 0o011)
    client = replica_set_mongo.client()
    db = client[f"t_bad_input_{os.getpid()}"]
    client.drop_database(db.name)
    config = base / "config.yml"
    config.write_text(yaml.safe_dump(raw_config(replica_set_mongo, db, dirs, lease_ttl="3s")))
    daemon = DaemonProcess(config, base / "daemon.log").start()
    try:
        daemon.wait_ready()
        jobs = {
            name: _insert_case(db, i, case, dirs["root"], base / "outside")
            for i, (name, case) in enumerate(CASES.items())
        }
        store = Store(db)
        good_result = _good_deploy(db, dirs["root"])
        try:
            wait_until(lambda: not _unsettled(store, daemon, jobs), 60, "every case to be refused")
        except Timeout:
            raise AssertionError(f"cases the daemon did not settle: {_unsettled(store, daemon, jobs)}") from None
        steps = {name: store.steps_for_job(job) if isinstance(job, ObjectId) else [] for name, job in jobs.items()}
        with contextlib.suppress(Timeout):  # deleted after the outcome; CorpusRun.containers_left names what is left
            wait_until(lambda: leftover_containers(lxd, db) == [], 30, "the good deploy's container deleted")
        left = leftover_containers(lxd, db)
        assert daemon.alive(), "the daemon died on the corpus"
        yield CorpusRun(daemon, jobs, steps, good_result, left, daemon.log_path.read_text(errors="replace"))
    finally:
        if daemon.alive():
            daemon.terminate(60)
        for name in leftover_containers(lxd, db):
            lxd.delete_container(name)
        client.drop_database(db.name)
        client.close()


def _good_deploy(db: Database, root: Path) -> Any:
    """After the corpus, a well-formed deploy still runs: the daemon is up and working."""
    app = make_app(
        db,
        name="good",
        container_image=BASE_IMAGE,
        env_vars=[{"var_key": "TOKEN", "var_value": SECRET}],
        modules=[module_doc("api", "/srv/api", "echo good buildpack ran")],
    )
    copy = root / "good" / "prod" / "web" / "api"
    copy.mkdir(parents=True)
    os.chown(copy, *WORKING_COPY_IDS)
    job = make_job(db, app, command="deploy", modules=["api"])
    set_status(db, job, "started")
    return run_buildpack(db, job, "api", timeout=90, poll_interval=0.2)


def _unsettled(store: Store, daemon: DaemonProcess, jobs: dict[str, Any]) -> list[str]:
    """Cases whose refusal is not visible yet (a terminal step record, or the log line)."""
    waiting = []
    for name, case in CASES.items():
        job = jobs[name]
        if case.where == "step":
            steps = store.steps_for_job(job)
            if not steps or not all(step.terminal for step in steps):
                waiting.append(name)
        elif case.where == "log" and not _log_reason(daemon, job):
            waiting.append(name)
    return waiting


def _log_reason(daemon: DaemonProcess, job: Any) -> str:
    found = daemon.saw("job_ignored_malformed", job_id=str(job))
    return found["reason"] if found else ""


@pytest.mark.lxd
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_ghost_input_is_refused_with_the_field_and_reason(name: str, corpus: CorpusRun) -> None:
    case, job = CASES[name], corpus.jobs[name]
    if case.where == "step":
        assert [step.state for step in corpus.steps[name]] == [FAILED]
        message = corpus.steps[name][0].message
    elif case.where == "log":
        message = _log_reason(corpus.daemon, job)
    else:
        assert corpus.steps[name] == [], "a command the daemon does not handle got a step"
        message = ""
    for part in case.expected:
        assert part in message, f"{part!r} not in {message[:500]!r}"
    assert len(message) < 2000, "the message repeats a huge value"
    assert not corpus.created_containers(job), "a container was created for a refused input"
    assert not corpus.ran_commands(job), "a command ran for a refused input"


@pytest.mark.lxd
def test_the_daemon_stays_up_runs_good_work_and_leaks_nothing_after_the_corpus(corpus: CorpusRun) -> None:
    assert corpus.daemon.alive()
    assert corpus.good_result.state == SUCCEEDED, corpus.good_result
    assert "good buildpack ran" in corpus.good_result.output_tail
    assert corpus.containers_left == []
    assert SECRET not in corpus.log_text


# --- Ghost's client -------------------------------------------------------------------------------------

CLIENT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "job id not an ObjectId": ({"job_id": "not-an-id"}, "job_id: expected an ObjectId"),
    "job id missing": ({"job_id": None}, "job_id: missing"),
    "job id a number": ({"job_id": 42}, "job_id: expected an ObjectId"),
    "module name empty": ({"module_name": " "}, "module_name: expected a module name"),
    "module name not a string": ({"module_name": ["api"]}, "module_name: expected a module name"),
    "timeout zero": ({"timeout": 0}, "timeout and poll_interval"),
    "unknown wait mode": ({"wait_mode": "push"}, "wait_mode: expected one of"),
    "unknown module script": ({"script": "pre_deploy"}, "script: expected one of build_pack, after_all_deploy"),
}


@pytest.mark.parametrize("name", list(CLIENT_CASES))
def test_client_refuses_bad_arguments_before_writing_anything(name: str, db: Database) -> None:
    changes, expected = CLIENT_CASES[name]
    arguments = {"job_id": ObjectId(), "module_name": "api", "timeout": 5, **changes}
    with pytest.raises(ValueError) as refused:
        run_buildpack(db, **arguments)
    assert expected in str(refused.value)
    assert db.container_steps.count_documents({}) == 0


# --- configuration files ----------------------------------------------------------------------------------

CONFIG_CASES: dict[str, tuple[Any, str]] = {
    "unknown key": ({"wokers": 4}, "wokers: unknown key"),
    "unknown nested key": ({"container": {"limit": {}}}, "container.limit: unknown key"),
    "workers not a number": ({"workers": "many"}, "workers: expected a whole number"),
    "workers zero": ({"workers": 0}, "workers: expected a whole number from 1 to 256"),
    "workers a boolean": ({"workers": True}, "workers: expected a whole number"),
    "lease_ttl too short": ({"lease_ttl": "1s"}, "lease_ttl: expected at least 3s"),
    "lease_ttl not a duration": ({"lease_ttl": "soon"}, "lease_ttl: expected a duration"),
    "exec_timeout zero": ({"container": {"exec_timeout": 0}}, "container.exec_timeout: expected a duration above"),
    "memory not a size": ({"container": {"limits": {"memory": "lots"}}}, "container.limits.memory: expected a size"),
    "cpu not a count": ({"container": {"limits": {"cpu": "two"}}}, "container.limits.cpu: expected a CPU count"),
    "processes negative": ({"container": {"limits": {"processes": -1}}}, "container.limits.processes: expected"),
    "privileged a string": ({"container": {"privileged": "yes"}}, "container.privileged: expected true or false"),
    "provisioner command a string": (
        {"container": {"provisioner_commands": {"salt": "salt-call"}}},
        "container.provisioner_commands.salt: expected a list of strings",
    ),
    "compression unknown": ({"container": {"publish_compression": "rar"}}, "container.publish_compression: expected"),
    "max_prepared negative": (
        {"container": {"max_prepared": -1}},
        "container.max_prepared: expected a whole number of at least 0, got -1",
    ),
    "lxd endpoint http": (
        {"lxd": {"endpoint": "http://lxd:8443"}},
        "lxd.endpoint: expected 'local', unix:/path/to/unix.socket or an https://",
    ),
    "cert without key": (
        {"lxd": {"endpoint": "https://lxd:8443", "cert": "/etc/c.pem"}},
        "lxd.cert: lxd.cert and lxd.key go together",
    ),
    "root relative": ({"ghost": {"root": "ghost"}}, "ghost.root: expected an absolute path"),
    "log_dir empty": ({"ghost": {"log_dir": ""}}, "ghost.log_dir: expected a non-empty string"),
    "events mode unknown": ({"events": {"mode": "push"}}, "events.mode: expected one of auto, change_stream, poll"),
    "section not a mapping": ({"mongodb": "mongodb://x"}, "mongodb: expected a mapping of keys"),
    "top level a list": (["workers: 4"], "(top level): expected a mapping of keys"),
    "metrics listen malformed": ({"metrics": {"listen": "9469"}}, "metrics.listen: expected host:port"),
    "retention inventory unknown": ({"retention": {"inventory": "s3"}}, "retention.inventory: expected one of"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_malformed_config_names_the_key_and_the_reason(name: str) -> None:
    raw, expected = CONFIG_CASES[name]
    with pytest.raises(ConfigError) as refused:
        config_from_mapping(raw, env={})
    assert any(expected in problem for problem in refused.value.problems), refused.value.problems


def test_every_config_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"workers": 0, "lease_ttl": "x", "wokers": 1}, env={})
    assert len(refused.value.problems) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("workers: [unclosed\n", "not valid YAML"), (None, "cannot read the configuration file")],
    ids=["not YAML", "missing file"],
)
def test_unreadable_config_file_is_refused_with_the_reason(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "config.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert expected in str(refused.value) and str(path) in str(refused.value)


def test_daemon_with_a_bad_config_exits_2_naming_the_keys_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"workers": 0, "container": {"limits": {"memory": "lots"}}}))
    done = subprocess.run(
        [sys.executable, "-m", "ghost_buildpackd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid configuration (2 problem(s))" in done.stderr
    assert "workers: expected a whole number from 1 to 256, got 0" in done.stderr
    assert (
        "container.limits.memory: expected a size like 2GiB or a share of the host's memory like 20%, got 'lots'"
        in done.stderr
    )
    assert "daemon_ready" not in done.stdout + done.stderr


def test_a_job_that_breaks_the_intake_does_not_stop_later_jobs(db: Database, store: Store, monkeypatch) -> None:
    """Defence in depth: an unexpected error on one job is logged, and the next job still gets its step."""
    from ghost_buildpackd.events import Intake

    poison_app, good_app = make_app(db, name="poison"), make_app(db, name="fine")
    poison, good = make_job(db, poison_app), make_job(db, good_app)
    finish_buildimage(db, poison)
    finish_buildimage(db, good)
    real_get_app = store.get_app

    def get_app(app_id: Any) -> Any:
        if app_id == poison_app:
            raise TypeError("something no one foresaw")
        return real_get_app(app_id)

    monkeypatch.setattr(store, "get_app", get_app)
    intake = Intake(store, on_new_steps=lambda: None, on_job_ended=lambda _job: None)
    for job in (poison, good):
        intake.handle_job_id(job)
    assert store.steps_for_job(poison) == []
    assert [step.state for step in store.steps_for_job(good)] == ["requested"]
