#!/usr/bin/env python3
"""How fast the command line answers quick questions: wall time and heavy imports.

    python bench/startup.py [--count 20480] [--passes 5] [--workdir DIR] [--json]
                            [--checkout DIR] [--save FILE]

Builds (once) a store of --count seeded random latents of the `compact` preset's shape
with labels 0-9, then runs each command in a fresh process --passes times and keeps the
best wall time: `latentbatch --help`, `inspect STORE`, `stores ROOT` and
`query STORE --label 3 --json`. A further run of each under `python -X importtime` names
the heavy modules it imported (none of torch, distributed, xarray, pandas or matplotlib
should be among them). The ratio column divides by a bare `python -c pass`.
``--checkout DIR`` times another checkout's command line instead (its
``latentbatch.cli.main`` with DIR first on the path), e.g. a worktree of an earlier release.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import best_seconds, random_store

from latentbatch.stores.store import Layout

HEAVY = (
    "torch",
    "distributed",
    "xarray",
    "pandas",
    "matplotlib",
    "prefect",
    "sklearn",
    "skimage",
    "scipy",
    "dask",
    "zarr",
    "numpy",
)
ENGINE = ("torch", "distributed", "xarray", "pandas", "matplotlib")


def heavy_modules(launch: list[str], args: list[str]) -> list[str]:
    """The modules of :data:`HEAVY` that running ``launch args`` imported."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", *launch[1:], *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in run.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return [name for name in HEAVY if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20_480)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--checkout", type=Path, help="Time this checkout's command line.")
    parser.add_argument("--save", type=Path, help="Also write the JSON to this file.")
    args = parser.parse_args()
    save = args.save.resolve() if args.save else None
    workdir = (
        args.workdir or Path(tempfile.mkdtemp(prefix="latentbatch-startup-bench-"))
    ).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = str(
        random_store(
            workdir / "stores" / f"random-{args.count}.zarr",
            args.count,
            Layout(1024, 128),
            labels=True,
        )
    )
    launch = [sys.executable, str(Path(sys.executable).parent / "latentbatch")]
    if args.checkout:  # that checkout's modules first, in every child process
        os.environ["PYTHONPATH"] = str(args.checkout.resolve())
        os.chdir(args.checkout)  # `python -c` puts the working folder first
        code = "import sys; from latentbatch.cli import main; sys.exit(main())"
        launch = [sys.executable, "-c", code]
    commands = {
        "help": ["--help"],
        "inspect": ["inspect", store],
        "stores": ["stores", str(workdir / "stores")],
        "query": ["query", store, "--label", "3", "--json"],
    }
    placeholders = {store: "STORE", str(workdir / "stores"): "ROOT"}
    python_s, _ = best_seconds([sys.executable, "-c", "pass"], args.passes)
    result: dict[str, object] = {
        "count": args.count,
        "passes": args.passes,
        "python_s": python_s,
        "cpus": os.cpu_count(),
        "checkout": str(args.checkout) if args.checkout else None,
    }
    for name, command in commands.items():
        seconds, every = best_seconds([*launch, *command], args.passes)
        result[f"{name}_s"] = seconds
        result[f"{name}_passes"] = every
        result[f"{name}_modules"] = heavy_modules(launch, command)
    if save:
        save.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"latentbatch start-up, best of {args.passes} fresh processes ({args.count:,}-row store)")
    print(f"{'command':<44} {'seconds':>8} {'x python':>9}  heavy modules imported")
    print(f"{'python -c pass':<44} {python_s:>8.3f} {1:>9.1f}")
    for name, command in commands.items():
        seconds = float(result[f"{name}_s"])  # type: ignore[arg-type]
        modules = result[f"{name}_modules"]
        assert isinstance(modules, list)
        engine = [m for m in modules if m in ENGINE]
        shown = ", ".join(modules) or "none"
        shown_args = [placeholders.get(c, c) for c in command]
        label = "latentbatch " + " ".join(shown_args)
        flag = f"  (engine: {', '.join(engine)})" if engine else ""
        print(f"{label:<44} {seconds:>8.3f} {seconds / python_s:>9.1f}  {shown}{flag}")


if __name__ == "__main__":
    main()
