"""The README and docs/: every `latentbatch ...` command in their fenced blocks names a
real subcommand and only options that subcommand accepts; every page the README links
exists; the README stays a front door."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from latentbatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def commands(page: Path) -> list[str]:
    """The `latentbatch ...` command lines of ``page``'s fenced blocks, continuation
    lines joined."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("latentbatch "):
                found.append(line)
    return found


def problems(line: str, root: Any) -> list[str]:
    """What is wrong with one command line: an unknown subcommand, a group without one,
    or options its command does not accept. Placeholders (``...``, ``[--opt X]``,
    ``a|b``) are read as the options they show."""
    tokens = [t.strip("[]") for t in shlex.split(line, comments=True)[1:]]
    tokens = [t for t in tokens if t and t != "..."]
    command = root  # typer's click commands: a group has ``commands``
    path = ["latentbatch"]
    wrong = []
    for token in tokens:
        if hasattr(command, "commands") and not token.startswith("-"):
            sub = command.commands.get(token)
            if sub is None:
                return [f"{' '.join(path)} has no subcommand {token!r}"]
            command, path = sub, [*path, token]
            continue
        if token.startswith("-") and not NUMBER.fullmatch(token):
            name = token.split("=", 1)[0]
            accepted = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            if name not in accepted | {"--help"}:
                wrong.append(f"{' '.join(path)} takes no option {name}")
    if hasattr(command, "commands") and "--help" not in tokens:
        wrong.append(f"{' '.join(path)} needs a subcommand")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_in_the_docs_is_a_real_one(page: Path) -> None:
    root = typer.main.get_command(app)
    lines = commands(page)
    found = {line: problems(line, root) for line in lines}
    assert {line: wrong for line, wrong in found.items() if wrong} == {}


def test_the_checker_catches_what_is_wrong() -> None:
    root = typer.main.get_command(app)
    assert problems("latentbatch decode --model m --store s --out o", root) == []
    assert problems("latentbatch decode ... --formt zarr", root) == [
        "latentbatch decode takes no option --formt"
    ]
    assert problems("latentbatch decodes --model m", root) == [
        "latentbatch has no subcommand 'decodes'"
    ]
    assert problems("latentbatch stack", root) == ["latentbatch stack needs a subcommand"]
    assert problems("latentbatch shift S --strength -0.5 [--seed 1]  # a comment", root) == []


def test_the_readme_is_a_front_door_whose_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert len(commands(ROOT / "README.md")) >= 8  # one per task
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/architecture.md" in links
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    for page in PAGES[1:]:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links {link}"
