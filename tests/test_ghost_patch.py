"""The change to Ghost 19.08 (`ghost/ghost-19.08.patch`): Python 2 code, calling this project's command as it parses.

Ghost runs on Python 2.7; lib2to3's Python 2 grammar (print statement) parses
what the patch adds. Each run of added lines is parsed with as little of the
hunk's context before it as makes it a complete statement. That grammar also
accepts some Python 3 syntax (annotations, keyword-only arguments, `raise ...
from`), so a Python 2.7 interpreter compiles the same fragments too:
GHOST_BUILDPACKD_TEST_PYTHON2, else the test runtime's (scripts/build-ghost-runtime,
which scripts/test builds), else `python2.7` on PATH.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from bson import ObjectId

from ghost_buildpackd.cli import build_parser
from ghost_buildpackd.ghost.documents import containers_off, parse_app
from ghost_buildpackd.model import DEPLOY
from tests.support.ghost_sources import python2

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # lib2to3 is deprecated, still in Python 3.11
    from lib2to3 import pygram, pytree
    from lib2to3.pgen2 import driver, parse, tokenize

PATCH = Path(__file__).resolve().parents[1] / "ghost" / "ghost-19.08.patch"
COMMAND = "/opt/ghost-buildpackd/current/bin/ghost-buildpackd"
F_STRING = re.compile(r"""(?<![A-Za-z0-9_])[rRbBuU]?[fF][rRbB]?['"]""")


def python2_parses(source: str) -> bool:
    grammar = pygram.python_grammar  # Python 2: print is a statement
    try:
        driver.Driver(grammar, convert=pytree.convert).parse_string(source + "\n")
    except (parse.ParseError, tokenize.TokenError, IndentationError):
        return False
    return not F_STRING.search(source)


def hunks(text: str) -> list[tuple[str, list[str]]]:
    """(file, lines of the hunk with their +/-/space marks) for each hunk of a unified diff."""
    found: list[tuple[str, list[str]]] = []
    current_file = ""
    for line in text.splitlines():
        if line.startswith("+++ "):
            current_file = line[4:].split("\t")[0].removeprefix("b/")
        elif line.startswith("@@"):
            found.append((current_file, []))
        elif found and line[:1] in (" ", "+", "-") and not line.startswith(("--- ", "+++ ")):
            found[-1][1].append(line)
    return found


def added_runs(lines: list[str]) -> list[tuple[list[str], list[str], list[str]]]:
    """Each run of added lines, with the new-side lines of its hunk before it and after it (context and additions)."""
    new_side: list[str] = []
    spans: list[tuple[int, int]] = []  # [start, end) of each run in new_side
    for line in lines:
        if line.startswith(("+", " ")):
            if line.startswith("+") and (not spans or spans[-1][1] != len(new_side)):
                spans.append((len(new_side), len(new_side)))
            new_side.append(line[1:])
            if line.startswith("+"):
                spans[-1] = (spans[-1][0], len(new_side))
    return [(new_side[:start], new_side[start:end], new_side[end:]) for start, end in spans]


def parses_with_least_context(before: list[str], run: list[str], after: list[str]) -> str | None:
    """The run with the fewest lines of context that parses as Python 2, or None: context before it first
    (an added `else:` needs its `if`), then after it (an added `if` or `try` whose body is context)."""
    for end in range(len(after) + 1):
        for start in range(len(before), -1, -1):
            source = textwrap.dedent("\n".join(before[start:] + run + list(after[:end])))
            if python2_parses(source):
                return source
    return None


def test_the_parser_tells_python_2_from_python_3():
    assert python2_parses('print "hello"\nfor k, v in d.iteritems():\n    x = u"%s" % k')
    assert not python2_parses('print("hello", end="")')
    assert not python2_parses('x = f"{y}"')


def added_fragments() -> list[tuple[str, str]]:
    """(file, source) of each run of added lines, with the least context that parses; asserts each parses."""
    patch_hunks = hunks(PATCH.read_text())
    assert {name for name, _ in patch_hunks} == {"libs/deploy.py", "commands/buildimage.py", "libs/lxd.py"}
    fragments, checked = [], 0
    for name, lines in patch_hunks:
        for before, run, after in added_runs(lines):
            source = parses_with_least_context(before, run, after)
            assert source is not None, f"{name}: not Python 2:\n" + "\n".join(run)
            fragments.append((name, source))
            checked += len(run)
    assert checked == sum(line.startswith("+") for _, lines in patch_hunks for line in lines)
    return fragments


def test_every_added_line_parses_as_python_2():
    fragments = added_fragments()  # asserts each run parses and that the runs hold every added line
    assert {name for name, _ in fragments} == {"libs/deploy.py", "commands/buildimage.py", "libs/lxd.py"}


COMPILE_ALL = """
import json, sys
failures = []
for name, source in json.load(sys.stdin):
    body = "".join("    " + line + "\\n" for line in source.splitlines())
    try:
        compile("def fragment():\\n" + body + "    pass\\n", name, "exec")
    except SyntaxError as error:
        failures.append("%s: %s" % (name, error))
print(json.dumps({"version": list(sys.version_info[:2]), "failures": failures}))
"""


def test_a_real_python_2_7_compiles_every_added_line():
    interpreter = python2()
    if interpreter is None:
        pytest.skip("no Python 2.7 here (run scripts/build-ghost-runtime, or set GHOST_BUILDPACKD_TEST_PYTHON2)")
    fragments = [*added_fragments(), ("python-3-only", "def f(*, a):\n    return a")]  # proves it can fail
    done = subprocess.run(
        [interpreter, "-c", COMPILE_ALL], input=json.dumps(fragments), capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout)
    assert report["version"] == [2, 7]
    assert [failure.split(":")[0] for failure in report["failures"]] == ["python-3-only"], report


def test_the_deploy_change_runs_this_projects_command_with_arguments_it_accepts():
    deploy = "\n".join(line for name, lines in hunks(PATCH.read_text()) if name == "libs/deploy.py" for line in lines)
    added = "\n".join(line[1:] for line in deploy.splitlines() if line.startswith("+"))
    call = re.search(r"gcall\('(?P<command>[^']+)'\.format\(\s*script_name, job\['_id'\], module\['name'\]\)", added)
    assert call is not None, added
    argv = shlex.split(call["command"].format("after_all_deploy", "0123456789abcdef01234567", "api"))
    assert argv[0] == COMMAND
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.script, args.job_id, args.module) == (
        "buildpack",
        "after_all_deploy",
        "0123456789abcdef01234567",
        "api",
    )
    # Ghost's own LXD deploy path is gone: the command runs in its stead (decide_like_the_patch says when).
    assert "-            container = LXDImageBuilder(app, job, None, log_file, config)" in deploy


# --- when the patched Ghost asks for a container: the added lines themselves, run -----------------------------

DECIDE = """
import json, sys
try:
    basestring
except NameError:  # the same lines under Python 3
    basestring = str
cases = json.load(sys.stdin)
calls = []
def gcall(command, description, log_file):
    calls.append('container')
def log(text, log_file):
    calls.append('said: ' + text)
{functions}
def decide(app, module, script_name, script_friendly_name, job, config, log_file):
{run}
    calls.append('host')
results = []
for app, config in cases:
    del calls[:]
    decide(app, {{'name': 'api'}}, 'build_pack', 'Buildpack', {{'_id': 'job'}}, config, 'log')
    results.append([container_source_image(app), containers_enabled(config), list(calls)])
print(json.dumps(results))
"""


def deploy_hunk_additions() -> list[list[str]]:
    """The runs of lines the patch adds to libs/deploy.py, without their marks."""
    runs = []
    for name, lines in hunks(PATCH.read_text()):
        if name == "libs/deploy.py":
            runs += [run for _before, run, _after in added_runs(lines)]
    return runs


def decide_like_the_patch(interpreter: str, cases: list[tuple[dict, dict]]) -> list[list]:
    """For each (app, Ghost config): the patch's container_source_image, containers_enabled, and what
    execute_module_script_on_ghost does (its added lines, run by `interpreter`)."""
    functions, branch = deploy_hunk_additions()[:2]
    run = textwrap.indent(textwrap.dedent("\n".join(branch)), "    ")
    program = DECIDE.format(functions="\n".join(functions), run=run)
    done = subprocess.run([interpreter, "-c", program], input=json.dumps(cases), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ENABLED = {"container": {"enabled": True}}
SOURCE_IMAGES = ["", "None", " None ", None, "missing", "a1b2c3d4e5f6"]


def patch_cases() -> list[tuple[dict, dict]]:
    cases = []
    for source in SOURCE_IMAGES:
        for built in (None, "5f0c0ffee0c0ffee0c0ffee0"):
            build_infos = {} if source == "missing" else {"source_container_image": source}
            if built:
                build_infos["container_image"] = built
            for config in (ENABLED, {}, {"container": {"enabled": False}}, {"container": None}):
                cases.append(({"build_infos": build_infos}, config))
    return cases


@pytest.mark.parametrize("runtime", ["python3", "python2.7"])
def test_the_patch_decides_as_the_daemon_does(runtime):
    """Same cases, same answer: the daemon makes a deploy step exactly when the patched Ghost asks for one."""
    interpreter = sys.executable if runtime == "python3" else python2()
    if interpreter is None:
        pytest.skip("no Python 2.7 here (set GHOST_BUILDPACKD_TEST_PYTHON2 to one)")
    cases = patch_cases()
    for (app, config), (source, enabled, calls) in zip(cases, decide_like_the_patch(interpreter, cases), strict=True):
        doc = {"_id": ObjectId(), "name": "shop", "env": "prod", "role": "web", "build_infos": app["build_infos"]}
        daemon_app = parse_app({**doc, "build_infos": {k: v for k, v in app["build_infos"].items() if v is not None}})
        assert (source or "") == daemon_app.source_container_image, app
        assert enabled is bool(config and (config.get("container") or {}).get("enabled")), config
        off = containers_off(daemon_app, enabled, DEPLOY)
        if off is None:
            assert calls == ["container"], (app, config)
        else:
            assert calls[-1] == "host", (app, config, calls)
        # One line says why the host runs it, only when the app is waiting for its first container image.
        waiting = enabled and source and not app["build_infos"].get("container_image")
        said = [call for call in calls if call.startswith("said: ")]
        assert len(said) == (1 if waiting else 0), (app, config, calls)
        if waiting:
            assert "a successful buildimage builds one" in said[0] and "container_image" in said[0]


def new_side(name: str) -> list[str]:
    """The lines of `name`'s hunks as the patched file has them (context and additions), stripped."""
    patch_hunks = hunks(PATCH.read_text())
    return [line[1:].strip() for file, lines in patch_hunks if file == name for line in lines if line[:1] in " +"]


def test_the_buildimage_change_runs_this_projects_command_where_ghost_ran_its_lxd_builder():
    buildimage = "\n".join(
        line for name, lines in hunks(PATCH.read_text()) if name == "commands/buildimage.py" for line in lines
    )
    added = "\n".join(line[1:] for line in buildimage.splitlines() if line.startswith("+"))
    call = re.search(r"gcall\('(?P<command>[^']+)'\.format\(self\._job\['_id'\]\)", added)
    assert call is not None, added
    argv = shlex.split(call["command"].format("0123456789abcdef01234567"))
    assert argv[0] == COMMAND
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.job_id) == ("buildimage", "0123456789abcdef01234567")
    # Ghost's own LXD builder never starts (with the group lxd missing it would raise at the job's start).
    assert "-            self._lxd_image_builder = LXDImageBuilder(" in buildimage
    assert "+        if containers_enabled(self._config) and container_source_image(self._app):" in buildimage
    assert "from libs.deploy import" in added and "container_source_image, containers_enabled" in added
    # Where 19.08 ran it: after the AMI is recorded and old AMIs purged, before the autoscaling group update;
    # a failure ends the job failed with 19.08's message and returns before that update.
    lines = new_side("commands/buildimage.py")
    order = [
        'log("Purge old AMIs failed", self._log_file)',
        "if containers_enabled(self._config) and container_source_image(self._app):",
        "except GCallException as e:",
        'self._worker.update_status("failed", message="An error occured during container process ({})".format(e))',
        "return",
        "if self._app['autoscale']['name']:",
    ]
    positions = [lines.index(line, lines.index(order[0])) for line in order]
    assert positions == sorted(positions), lines
