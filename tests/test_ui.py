"""The Prefect UI in headless Chromium: start a decode from the deployment's form and see
its artifacts. Screenshots go to $LATENTBATCH_SCREENSHOTS (default .scratch/screenshots)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from distributed import Client

from latentbatch.encode import encode
from latentbatch.store import Layout
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
]


def _screenshots() -> Path:
    folder = Path(os.environ.get("LATENTBATCH_SCREENSHOTS", ROOT / ".scratch" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _artifact(api_url: str, key: str) -> dict[str, Any]:
    """The newest artifact with ``key``, straight from the server's REST API."""
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    response = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=10)
    found = response.raise_for_status().json()
    assert found, f"no artifact {key}"
    return found[0]


def _field(page: Any, label: str, tag: str = "textarea") -> Any:
    """The form control that follows the label whose text starts with ``label``."""
    return page.locator(
        f"xpath=//label[starts-with(normalize-space(.), '{label}')]/following::{tag}[1]"
    )


def test_decode_started_from_the_ui_form(
    running_stack: Any, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    from playwright.sync_api import expect, sync_playwright

    store, out = tmp_path / "ui.zarr", tmp_path / "ui-out"
    encode(tiny_model, "synthetic:40", str(store), layout=Layout(16, 8), client=client)
    shots = _screenshots()
    run_name = f"ui-decode-{tmp_path.name}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{running_stack.ui_url}/deployments")
        deployment = page.get_by_role("link", name="decode-latents", exact=True).first
        expect(deployment).to_be_visible(timeout=30_000)
        page.screenshot(path=shots / "deployments.png")

        deployment.click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        _field(page, "Run Name", "input").fill(run_name)
        for name, value in (("model_dir ", tiny_model), ("store ", store), ("out ", out)):
            _field(page, name).fill(str(value))
        page.get_by_role("button", name="Submit").click()
        run_link = page.get_by_role("link", name=run_name).first
        expect(run_link).to_be_visible(timeout=30_000)
        run_link.click()
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=240_000)
        page.screenshot(path=shots / "run.png", full_page=True)

        preview = _artifact(running_stack.api_url, "decode-preview")
        page.goto(f"{running_stack.ui_url}/artifacts/artifact/{preview['id']}")
        image = page.locator("img[src^='data:image/png;base64,']").first
        expect(image).to_be_visible(timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") > 0
        page.screenshot(path=shots / "preview-artifact.png", full_page=True)
        browser.close()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 40
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        f"shard-00000{i}.tar" for i in range(3)
    ]
    summary = _artifact(running_stack.api_url, "decode-summary")
    assert json.loads(summary["data"])[0]["out"] == str(out)
