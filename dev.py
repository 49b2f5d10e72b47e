#!/usr/bin/env python3
"""Set up latentbatch in ./.venv and run its main job or its tests.

    python3 dev.py demo          install (data extra), then run the reconstruction-pipeline
                                 flow (python -m flows.pipeline) on embedded defaults
    python3 dev.py test [ARGS]   install (dev extra), then ruff check + format --check, mypy
                                 (strict, on latentbatch/, flows/ and dev.py), lint-imports (the
                                 layers in pyproject.toml), pytest ARGS

Needs only python3 (3.11+). Installs use constraints.txt, which pins the CPU torch wheel.
Re-running skips the install while pyproject.toml and constraints.txt are unchanged.
Set-up prints one line per step with its time; the installers' output goes to
.venv/setup.log and is shown (its last lines, and its path) only when a step fails, and
so do the checks' outputs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
SCRATCH = ROOT / ".scratch"
LOG = VENV / "setup.log"
SHOWN_LINES = 25  # of the log, when a step fails


class StepFailedError(Exception):
    """A set-up step or a check ended with an error; its output has been shown."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def step(
    what: str, command: Sequence[str | Path], log: Path = LOG, *, env: dict[str, str] | None = None
) -> None:
    """Run one set-up step: one line (``what``, then its time); its output appended to
    ``log``, whose last lines and path are shown only when it fails."""
    print(f"{what} ...", end="", flush=True)
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(str(a) for a in command)}\n")
        out.flush()
        code = subprocess.run(
            [str(a) for a in command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.perf_counter() - started
    if code == 0:
        print(f" {seconds:.0f} s", flush=True)
        return
    print(f" failed (exit {code}, {seconds:.0f} s); the last lines of {log}:", flush=True)
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(f"  {line}" for line in lines[-SHOWN_LINES:]), flush=True)
    print(f"the whole output: {log}", flush=True)
    raise StepFailedError(code)


def check(what: str, command: Sequence[str | Path], env: dict[str, str]) -> None:
    """Run one check: one line when it passes, its whole output when it fails."""
    print(f"{what} ...", end="", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [str(a) for a in command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        print(f" ok, {seconds:.0f} s", flush=True)
        return
    print(f" failed (exit {done.returncode}):", flush=True)
    print(done.stdout + done.stderr, end="", flush=True)
    raise StepFailedError(done.returncode)


def ensure_env(extra: str) -> None:
    """Create .venv and install the package with ``extra`` unless already done."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 the user has
        sys.exit(f"latentbatch needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    inputs = b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints.txt"))
    key = hashlib.sha256(inputs + extra.encode()).hexdigest()
    stamp = VENV / ".installed"
    if not (BIN / "python").exists():
        print(f"creating {VENV} ...", end="", flush=True)
        started = time.perf_counter()
        venv.create(VENV, with_pip=True)
        print(f" {time.perf_counter() - started:.0f} s", flush=True)
    if stamp.exists() and stamp.read_text() == key:
        return
    pip: list[str | Path] = [BIN / "python", "-m", "pip", "--disable-pip-version-check"]
    step("upgrading pip", [*pip, "install", "--upgrade", "pip"])
    step(
        f"installing latentbatch[{extra}] and its dependencies (a few minutes the first time)",
        [*pip, "install", "-c", "constraints.txt", "-e", f".[{extra}]"],
    )
    stamp.write_text(key)


SYSTEM_PACKAGES = {
    "chromium": ["/usr/bin/chromium"],
    "postgresql": ["/usr/lib/postgresql/*/bin/initdb"],
    "kubectl": ["/usr/bin/kubectl"],
}


def ensure_system_packages() -> None:
    """Debian's Chromium, PostgreSQL and kubectl for the browser, topology and infra tests
    (``kubectl apply --dry-run=client`` of every manifest): installed when
    missing and we are root; otherwise those tests skip (and fail where CI is set)."""
    missing = [
        name
        for name, patterns in SYSTEM_PACKAGES.items()
        if not any(any(Path("/").glob(p.lstrip("/"))) for p in patterns)
    ]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: {', '.join(missing)} missing; the tests that need them will skip", flush=True)
        return
    apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    step("apt-get update", ["apt-get", "update"], env=apt)
    step(f"apt-get install {' '.join(missing)}", ["apt-get", "install", "-y", *missing], env=apt)


def stack_env() -> dict[str, str]:
    """Addresses of a running `latentbatch stack` (empty when none answers)."""
    path = SCRATCH / "stack" / "stack.env"
    if not path.is_file():
        return {}
    env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    try:
        with urllib.request.urlopen(f"{env.get('PREFECT_API_URL')}/health", timeout=2):
            return env
    except (OSError, ValueError):
        return {}


def offline_env() -> dict[str, str]:
    """Environment for every command: Prefect state in .scratch, no telemetry."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(SCRATCH / "prefect"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    # Prefect's temporary server migrates a new database on its first start, which can
    # take longer than its 20 s default on a small or busy machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.setdefault("MPLBACKEND", "Agg")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    SCRATCH.mkdir(exist_ok=True)
    env = offline_env()
    try:
        if command == "demo":
            ensure_env("data")
            stack = stack_env()
            if stack:
                print(f"using the running stack: {stack['PREFECT_UI_URL']}", flush=True)
                env.update(stack)
            demo = [str(BIN / "python"), "-m", "flows.pipeline", *rest]
            return subprocess.run(demo, cwd=ROOT, env=env).returncode
        ensure_env("dev")
        ensure_system_packages()
        check("ruff check", [BIN / "ruff", "check", "."], env)
        check("ruff format --check", [BIN / "ruff", "format", "--check", "."], env)
        check("mypy (strict)", [BIN / "mypy"], env)
        check(
            "lint-imports (the contracts in pyproject.toml)",
            [BIN / "lint-imports", "--no-cache"],
            env,
        )
    except StepFailedError as failed:
        return failed.code
    pytest = [str(BIN / "python"), "-m", "pytest", *rest]
    print("+", " ".join(pytest[1:]), flush=True)
    return subprocess.run(pytest, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
