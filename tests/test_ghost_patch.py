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
import os
import re
import shlex
import shutil
import subprocess
import textwrap
import warnings
from pathlib import Path

import pytest

from ghost_buildpackd.cli import build_parser
from tests.support.ghost_worker import runtime_python2

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


def added_runs(lines: list[str]) -> list[tuple[list[str], list[str]]]:
    """Each run of added lines, with the new-side lines before it in its hunk (context and earlier additions)."""
    runs: list[tuple[list[str], list[str]]] = []
    after: list[str] = []
    run: list[str] = []
    for line in [*lines, " "]:
        if line.startswith("+"):
            run.append(line[1:])
            continue
        if run:
            runs.append((list(after), run))
            after += run
            run = []
        if line.startswith(" "):
            after.append(line[1:])
    return runs


def parses_with_least_context(before: list[str], run: list[str]) -> str | None:
    """The run with the fewest lines of context before it that parses as Python 2, or None."""
    for start in range(len(before), -1, -1):
        source = textwrap.dedent("\n".join(before[start:] + run))
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
        for before, run in added_runs(lines):
            source = parses_with_least_context(before, run)
            assert source is not None, f"{name}: not Python 2:\n" + "\n".join(run)
            fragments.append((name, source))
            checked += len(run)
    assert checked == sum(line.startswith("+") for _, lines in patch_hunks for line in lines)
    return fragments


def test_every_added_line_parses_as_python_2():
    assert len(added_fragments()) == 4


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


def python2() -> str | None:
    """A Python 2.7 interpreter that runs: the given one, else the Ghost runtime's (scripts/build-ghost-runtime)."""
    candidate = (
        os.environ.get("GHOST_BUILDPACKD_TEST_PYTHON2") or str(runtime_python2() or "") or shutil.which("python2.7")
    )
    if not candidate:
        return None
    probe = subprocess.run([candidate, "-c", "import sys; sys.exit(sys.version_info[:2] != (2, 7))"], check=False)
    return candidate if probe.returncode == 0 else None


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
    # The per-app switch is the one the daemon uses, and Ghost's own LXD deploy path is gone.
    assert "+        if app['build_infos'].get('source_container_image'):" in deploy
    assert "-            container = LXDImageBuilder(app, job, None, log_file, config)" in deploy


@pytest.mark.parametrize("marker", ["+", "-"])
def test_the_buildimage_change_only_stops_ghosts_lxd_builder(marker):
    buildimage = [
        line for name, lines in hunks(PATCH.read_text()) if name == "commands/buildimage.py" for line in lines
    ]
    changed = [line[1:].strip() for line in buildimage if line.startswith(marker) and line[1:].strip()]
    if marker == "-":
        assert changed == [
            "if lxd_is_available(self._config) and self._app.get('build_infos', {})"
            ".get('source_container_image', None):",
            "self._lxd_image_builder = LXDImageBuilder(self._app, self._job, self._db, self._log_file, self._config)",
        ]
    else:
        assert all(line.startswith("#") for line in changed)
