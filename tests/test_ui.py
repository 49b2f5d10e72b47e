"""The Prefect UI in headless Chromium: start a decode from the deployment's form and see
its artifacts. Screenshots go to $LATENTBATCH_SCREENSHOTS (default .scratch/screenshots)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from distributed import Client

from latentbatch.encode import encode
from latentbatch.stores.store import Layout
from tests.conftest import ROOT, needs

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
pytestmark = [
    pytest.mark.slow,
    needs(CHROMIUM.exists(), "Debian's chromium (apt-get install chromium)"),
]


def _screenshots() -> Path:
    folder = Path(os.environ.get("LATENTBATCH_SCREENSHOTS", ROOT / ".scratch" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _api(api_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    if body is None:
        response = httpx.get(f"{api_url}{path}", timeout=10)
    else:
        response = httpx.post(f"{api_url}{path}", json=body, timeout=10)
    return response.raise_for_status().json()


def _finished_run(api_url: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
    """Poll the REST API until the flow run is in a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(api_url, f"/flow_runs/{run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def _run_named(api_url: str, name: str, timeout: float = 60) -> str | None:
    """The id of the flow run called ``name``, once the API has it (None after timeout)."""
    body = {"flow_runs": {"name": {"any_": [name]}}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _api(api_url, "/flow_runs/filter", body)
        if found:
            return str(found[0]["id"])
        time.sleep(1)
    return None


def _artifacts(api_url: str, run_id: str) -> dict[str, Any]:
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    return {a["key"]: a for a in _api(api_url, "/artifacts/filter", body) if a["key"]}


def _field(page: Any, label: str, tag: str = "textarea") -> Any:
    """The form control that follows the label whose text starts with ``label``."""
    return page.locator(
        f"xpath=//label[starts-with(normalize-space(.), '{label}')]/following::{tag}[1]"
    )


def _custom_run(
    page: Any, api_url: str, fields: dict[str, Any], run_name: str, shot: Path | None = None
) -> str:
    """From an open deployment's page: fill its Custom run form with ``fields`` (label →
    value; each parameter's description shown with it), submit it, and return the run's
    id, found through the API (the UI's toast with its link may come and go before a slow
    machine looks)."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    # the form fills its defaults in after it appears: wait for them, then fill ours
    expect(_field(page, "model_dir ")).to_have_value("models/seed-mnist5k", timeout=30_000)
    description = page.get_by_text("Latent store: local path or s3:// URL", exact=True)
    expect(description.first).to_be_visible(timeout=30_000)
    if shot is not None:
        page.screenshot(path=shot, full_page=True)
    for name, value in fields.items():
        _field(page, name).fill(str(value))
        expect(_field(page, name)).to_have_value(str(value))
    _field(page, "Run Name", "input").fill(run_name)
    expect(_field(page, "Run Name", "input")).to_have_value(run_name)
    submit = page.get_by_role("button", name="Submit")
    expect(submit).to_be_enabled(timeout=30_000)
    submit.click()
    run_id = _run_named(api_url, run_name)
    assert run_id is not None, f"submitting the form created no run named {run_name}"
    return run_id


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

        page.get_by_role("link", name="nightly-bulk-decode", exact=True).first.click()
        expect(page.get_by_text("At 02:00 AM every day").first).to_be_visible(timeout=30_000)
        page.screenshot(path=shots / "nightly-schedule.png")
        page.goto(f"{running_stack.ui_url}/deployments")
        deployment = page.get_by_role("link", name="decode-latents", exact=True).first

        deployment.click()
        run_id = _custom_run(
            page,
            running_stack.api_url,
            {"model_dir ": tiny_model, "store ": store, "out ": out},
            run_name,
            shots / "decode-form.png",
        )
        page.goto(f"{running_stack.ui_url}/runs/flow-run/{run_id}")
        run = _finished_run(running_stack.api_url, run_id)
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["parameters"]["out"] == str(out)
        page.reload()
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=shots / "run.png", full_page=True)

        found = _artifacts(running_stack.api_url, run_id)
        page.goto(f"{running_stack.ui_url}/artifacts/artifact/{found['decode-preview']['id']}")
        image = page.locator("img[src^='data:image/png;base64,']").first
        expect(image).to_be_visible(timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") > 0
        page.screenshot(path=shots / "preview-artifact.png", full_page=True)
        browser.close()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 40
    # the deployment's images_per_shard (10,240) puts all 40 images in one shard
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert json.loads(found["decode-summary"]["data"])[0]["out"] == str(out)
    assert float(found["decode-progress"]["data"]) == 100.0


def test_find_anomalies_started_from_the_ui_form(
    running_stack: Any, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    from playwright.sync_api import expect, sync_playwright

    reference, store = tmp_path / "normal.zarr", tmp_path / "new.zarr"
    encode(tiny_model, "synthetic:80", str(reference), layout=Layout(16, 8), client=client)
    encode(tiny_model, "digits", str(store), layout=Layout(16, 8), limit=24, client=client)
    run_name = f"ui-anomalies-{tmp_path.name}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{running_stack.ui_url}/deployments")
        page.get_by_role("link", name="find-anomalies", exact=True).first.click()
        fields = {"store ": store, "reference ": reference, "model_dir ": tiny_model}
        run_id = _custom_run(page, running_stack.api_url, fields, run_name)
        run = _finished_run(running_stack.api_url, run_id)
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["parameters"]["reference"] == str(reference)
        found = _artifacts(running_stack.api_url, run_id)
        page.goto(f"{running_stack.ui_url}/artifacts/artifact/{found['anomaly-preview']['id']}")
        image = page.locator("img[src^='data:image/png;base64,']").first
        expect(image).to_be_visible(timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") > 0
        page.screenshot(path=_screenshots() / "anomaly-artifact.png", full_page=True)
        browser.close()
    summary = json.loads(found["anomaly-summary"]["data"])[0]
    assert summary["scored"] == 24 and summary["reference"] == str(reference)
