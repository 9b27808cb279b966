"""One check's result and the line it prints: OK, WARN (a risk that does not stop the daemon) or FAIL
with the fix."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but with a risk worth acting on

    def render(self) -> str:
        label = "FAIL" if not self.ok else "WARN" if self.warning else "OK  "
        line = f"{label}  {self.name}: {self.detail}\n"
        return line + (f"      fix: {self.fix}\n" if (not self.ok or self.warning) and self.fix else "")


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, False, detail, fix)


def warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, True, detail, fix, warning=True)
