#!/usr/bin/env python3
"""Set up latentbatch in ./.venv and run its main job or its tests.

    python3 dev.py demo          install (data extra), then run the reconstruction-pipeline
                                 flow (python -m flows.pipeline) on embedded defaults
    python3 dev.py test [ARGS]   install (dev extra), then ruff check + format --check, mypy
                                 (strict, on latentbatch/ and flows/), lint-imports (the
                                 layers in pyproject.toml), pytest ARGS

Needs only python3 (3.11+). Installs use constraints.txt, which pins the CPU torch wheel.
Re-running skips the install while pyproject.toml and constraints.txt are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
SCRATCH = ROOT / ".scratch"


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def ensure_env(extra: str) -> None:
    """Create .venv and install the package with ``extra`` unless already done."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 the user has
        sys.exit(f"latentbatch needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    inputs = b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints.txt"))
    key = hashlib.sha256(inputs + extra.encode()).hexdigest()
    stamp = VENV / ".installed"
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if stamp.exists() and stamp.read_text() == key:
        return
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(BIN / "python", "-m", "pip", "install", "-c", "constraints.txt", "-e", f".[{extra}]")
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
    _run("apt-get", "update", "-qq")
    _run("apt-get", "install", "-y", "-qq", *missing)


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
    checks = (
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
        ["lint-imports", "--no-cache"],
    )
    for check in checks:
        print("+", " ".join(check), flush=True)
        code = subprocess.run([str(BIN / check[0]), *check[1:]], cwd=ROOT, env=env).returncode
        if code:
            return code
    pytest = [str(BIN / "python"), "-m", "pytest", *rest]
    print("+", " ".join(pytest[1:]), flush=True)
    return subprocess.run(pytest, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
