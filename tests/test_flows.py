"""Every flow against a real Prefect API (a temporary server), artifacts read back."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from distributed import Client
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.testing.utilities import prefect_test_harness

from flows.anomalies import find_anomalies
from flows.decode import decode_latents
from flows.encode import encode_images
from flows.evaluate import evaluate_model
from flows.generate import generate_latents
from flows.imports import import_latents_flow
from flows.manipulate import manipulate_latents
from flows.nightly import nightly_bulk_decode
from flows.pipeline import reconstruction_pipeline
from flows.query import query_latents
from flows.train import train_autoencoder
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.ids import short_id
from latentbatch.models.checkpoint import model_id, read_info
from latentbatch.storage.lease import Lease
from latentbatch.stores.store import Layout, open_store
from tests.helpers import altered_model, sha256s
from tests.servers import TcpProxy, moto_server


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _artifacts(flow_run_id: UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def artifacts(state: Any) -> dict[str, Any]:
    """Artifacts of a flow run (and of its tasks), by key."""
    found = asyncio.run(_artifacts(state.state_details.flow_run_id))
    return {a.key: a for a in found if a.key}


def _image_bytes(markdown: str) -> bytes:
    prefix = "data:image/png;base64,"
    start = markdown.index(prefix) + len(prefix)
    return base64.b64decode(markdown[start : markdown.index(")", start)])


def _check_preview(artifact: Any) -> None:
    assert artifact.type == "markdown"
    png = _image_bytes(artifact.data)
    assert png.startswith(b"\x89PNG")
    assert len(png) <= 60_000


@pytest.mark.parametrize(
    "flow",
    [decode_latents, encode_images, nightly_bulk_decode, reconstruction_pipeline,
     query_latents, train_autoencoder, evaluate_model, find_anomalies, generate_latents,
     manipulate_latents, import_latents_flow],
    ids=lambda f: f.name,
)  # fmt: skip
def test_every_flow_parameter_has_a_description_for_the_ui(flow: Any) -> None:
    properties = flow.parameters.model_dump()["properties"]
    assert properties
    missing = [name for name, schema in properties.items() if not schema.get("description")]
    assert missing == []
    assert flow.description  # the flow's summary line


def test_evaluate_flow_leaves_the_table_and_the_plot(tiny_model: Path) -> None:
    state = evaluate_model(str(tiny_model), "synthetic:96", "validation", [20, 80],
                           return_state=True)  # fmt: skip
    assert state.is_completed()
    result = state.result()
    assert result["split"] == "validation" and result["images"] == 24
    assert [p["quality"] for p in result["webp"]] == [20, 80]
    found = artifacts(state)
    assert found["evaluate-table"].type == "table"
    table = json.loads(found["evaluate-table"].data)
    model_id = result["model_id"]
    assert [row["what"] for row in table][:2] == [f"compact {short_id(model_id)}", "Pillow JPEG"]
    assert table[0]["bpp"] == round(result["model"]["bpp"], 4)
    _check_preview(found["evaluate-plot"])


def test_train_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "models" / "compact-digits"  # no out: named by the one rule
    state = train_autoencoder("digits", "compact", 1, 0, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["epochs"] == 1
    assert (out / "model.safetensors").is_file()
    found = artifacts(state)
    assert {"train-summary", "train-reconstructions", "train-curves"} <= set(found)
    assert found["train-summary"].type == "table"
    assert summary["model_id"] in found["train-summary"].data
    _check_preview(found["train-reconstructions"])
    _check_preview(found["train-curves"])
    codec = train_autoencoder(
        "digits", "codec", 1, 0, str(tmp_path / "codec"), rate_lambda=0.02, return_state=True
    )
    assert codec.is_completed() and codec.result()["val_bpp_estimated"] > 0
    trained = read_info(tmp_path / "codec").meta["training"]["config"]
    assert (trained["rate_lambda"], trained["batch_size"]) == (0.02, 64)  # the preset's


def test_encode_and_decode_flows(tmp_path: Path, tiny_model: Path, client: Client) -> None:
    store, out = str(tmp_path / "s.zarr"), str(tmp_path / "out")
    address = client.scheduler.address
    state = encode_images(
        str(tiny_model), "synthetic:60", store, False, address, None, return_state=True
    )
    assert state.is_completed()
    assert state.result()["images"] == 60
    found = artifacts(state)
    assert found["encode-progress"].type == "progress"
    assert float(found["encode-progress"].data) == 100.0
    assert found["encode-summary"].type == "table"
    _check_preview(found["encode-preview"])

    state = decode_latents(
        str(tiny_model), store, out, "png", address, None, False, return_state=True
    )
    assert state.is_completed()
    assert state.result()["decoded"] == 60
    assert (tmp_path / "out" / "manifest.json").is_file()
    found = artifacts(state)
    assert float(found["decode-progress"].data) == 100.0
    assert (
        '"decoded": 60' in found["decode-summary"].data.replace("'", '"')
        or "60" in found["decode-summary"].data
    )
    _check_preview(found["decode-preview"])


async def _task_runs(flow_run_id: UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_bad_input_fails_once_without_retries(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    missing = tmp_path / "none.zarr"
    state = decode_latents(
        str(tiny_model), str(missing), str(tmp_path / "o"), "tar", client.scheduler.address, None,
        False, return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert f"StoreError: {missing} does not exist" in str(state.message)
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [(r.state_name, r.run_count) for r in runs] == [("Failed", 1)]


def test_nightly_decodes_grown_skips_done_and_reports_corrupt(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    root, out_root, models = tmp_path / "stores", tmp_path / "decoded", tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny")
    layout = Layout(16, 8)
    for name in ("done", "grown", "corrupt", "broken", "stolen", "held", "tampered"):
        encode(tiny_model, "synthetic:30", str(root / f"{name}.zarr"), layout=layout, client=client)
        decode(tiny_model, str(root / f"{name}.zarr"), str(out_root / name), images_per_shard=16,
               client=client)  # fmt: skip
    encode(tiny_model, "digits", str(root / "grown.zarr"), append=True, limit=10, client=client)
    encode(tiny_model, "digits", str(root / "held.zarr"), append=True, limit=10, client=client)
    holder = Lease(str(out_root / "held"), None, "decode by hand", 60)
    holder.acquire()  # another writer (a manual decode, say) is at it
    tampered = out_root / "tampered" / "shard-000001.tar"
    tampered.write_bytes(tampered.read_bytes()[:-512])
    shutil.rmtree(out_root / "corrupt")
    (root / "corrupt.zarr" / "latents" / "zarr.json").write_text("{ not json")
    (root / "broken.zarr" / "zarr.json").write_text("{ not json")  # the store's own metadata
    shutil.rmtree(out_root / "stolen")
    shutil.copytree(out_root / "done", out_root / "stolen")  # another store's decode
    done_before = sha256s(out_root / "done")

    state = nightly_bulk_decode(
        str(root),
        str(out_root),
        str(models),
        "tar",
        client.scheduler.address,
        None,
        images_per_shard=16,
        return_state=True,
    )
    holder.release()
    assert state.is_failed()
    for name in ("corrupt", "broken", "stolen", "tampered"):
        assert str(root / f"{name}.zarr") in str(state.message)
    assert "4 of 7 stores failed" in str(state.message)
    assert sha256s(out_root / "done") == done_before
    manifest = json.loads((out_root / "grown" / "manifest.json").read_text())
    assert manifest["count"] == 40
    rows = {Path(r["store"]).stem: r for r in json.loads(artifacts(state)["nightly-summary"].data)}
    assert {name: r["action"] for name, r in rows.items()} == {
        "broken": "failed",
        "corrupt": "failed",
        "done": "skipped",
        "grown": "decoded",
        "stolen": "failed",
        "held": "skipped",
        "tampered": "failed",
    }
    assert rows["done"]["detail"] == "output is complete (sizes and ids ok)"
    assert "being written by another decode by hand" in rows["held"]["detail"]
    assert "shard-000001.tar: size" in rows["tampered"]["detail"]
    assert "damaged" in rows["broken"]["detail"] and "damaged" in rows["corrupt"]["detail"]
    assert "another store" in rows["stolen"]["detail"]
    _check_preview(artifacts(state)["nightly-preview"])
    grown = rows["grown"]
    assert grown["model_id"] == model_id(tiny_model)
    assert grown["shards_written"] == 2 and grown["shards_skipped"] == 1
    assert grown["seconds"] > 0 and grown["images_per_second"] > 0


def test_nightly_fails_a_store_whose_canary_drifted_and_decodes_the_others(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    """Store a's id check is bypassed (its metadata names a model whose weights were
    altered a little): the canary stops a's decode before anything is written, the night
    decodes b and ends Failed naming a, and the report shows each store's canary."""
    root, out_root, models = tmp_path / "stores", tmp_path / "decoded", tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny")
    altered = altered_model(tiny_model, models / "altered")
    for name in ("a", "b"):
        encode(tiny_model, "synthetic:30", str(root / f"{name}.zarr"), layout=Layout(16, 8),
               client=client)  # fmt: skip
    store = open_store(str(root / "a.zarr"), writable=True)
    store.write_meta(model_id=read_info(altered).model_id)
    state = nightly_bulk_decode(str(root), str(out_root), str(models), "tar",
                                client.scheduler.address, return_state=True)  # fmt: skip
    assert state.is_failed()
    assert str(root / "a.zarr") in str(state.message)
    assert str(root / "b.zarr") not in str(state.message)
    rows = {r["store"]: r for r in json.loads(artifacts(state)["nightly-summary"].data)}
    a, b = rows[str(root / "a.zarr")], rows[str(root / "b.zarr")]
    assert a["action"] == "failed" and "the canary drifted" in a["detail"]
    assert (b["action"], b["canary"]) == ("decoded", "exact")
    assert not (out_root / "a").exists() or not list((out_root / "a").glob("shard-*"))
    assert (out_root / "b" / "manifest.json").is_file()


def test_nightly_over_s3_retries_when_the_endpoint_goes_away(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    """The nightly run over an S3 root (moto behind a TCP proxy) with its models on S3,
    its settings in a Secret block. As the 4th shard record of one store goes out, the
    endpoint goes away for 2 s: that store's decode fails, Prefect retries it once the
    endpoint is back, and the retry skips every finished (recorded) shard; the outputs
    equal a local decode."""
    import s3fs
    from prefect.blocks.system import Secret

    from latentbatch.outputs.shards import read_output

    (tmp_path / "moto").mkdir()
    with moto_server(tmp_path / "moto") as endpoint:
        proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
        proxy.start()
        direct = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        through_proxy = {
            **direct,
            "endpoint_url": proxy.url,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
        Secret(value=through_proxy).save("nightly-s3", overwrite=True)
        s3fs.S3FileSystem(**direct).mkdir("nightly")
        layout = Layout(8, 4)
        encode(tiny_model, "synthetic:160", "s3://nightly/stores/a.zarr", layout=layout,
               storage_options=direct, client=client)  # fmt: skip
        encode(tiny_model, "synthetic:24", "s3://nightly/stores/b.zarr", layout=layout,
               storage_options=direct, client=client)  # fmt: skip
        for name in ("model.safetensors", "config.json"):  # the models root is on S3 too
            s3fs.S3FileSystem(**direct).pipe_file(
                f"nightly/models/tiny/{name}", (tiny_model / name).read_bytes()
            )
        proxy.go_away_after(b"PUT /nightly/decoded/a/.records/", count=4, seconds=2)
        state = nightly_bulk_decode(
            "s3://nightly/stores", "s3://nightly/decoded", "s3://nightly/models", "tar",
            client.scheduler.address, None, "png", None, "nightly-s3", 8, return_state=True,
        )  # fmt: skip
        runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
        assert state.is_completed(), [(r.name, r.run_count, r.state_name) for r in runs]
        assert proxy.outages == 1
        decodes = {r.name: r for r in runs if r.name.startswith("decode ")}
        assert decodes["decode a.zarr"].run_count == 2  # failed once, retried
        assert decodes["decode b.zarr"].run_count == 1
        rows = {r["store"]: r for r in json.loads(artifacts(state)["nightly-summary"].data)}
        a = rows["s3://nightly/stores/a.zarr"]
        assert a["action"] == "decoded"
        # the 3 records before the 4th were complete when the endpoint went away (the 4th
        # PUT may have been cut off): the retry redid none of the finished shards
        assert a["shards_skipped"] >= 3
        assert a["shards_written"] + a["shards_skipped"] == 20
        local = tmp_path / "local"
        decode(tiny_model, "s3://nightly/stores/a.zarr", str(local), storage_options=direct,
               images_per_shard=8, client=client)  # fmt: skip
        ids, images = read_output("s3://nightly/decoded/a", direct)
        local_ids, local_images = read_output(str(local))
        assert ids == local_ids
        np.testing.assert_array_equal(images, local_images)
        fs = s3fs.S3FileSystem(**direct)
        remote = json.loads(fs.cat_file("nightly/decoded/a/manifest.json"))
        here = json.loads((local / "manifest.json").read_text())
        assert remote["shard_table"] == here["shard_table"]  # every shard's sha256 alike
        _check_preview(artifacts(state)["nightly-preview"])
        log = "\n".join(str(r) for r in asyncio.run(_logs(state.state_details.flow_run_id)))
        assert "testing" not in log  # the credentials never reach the logs


async def _logs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        return await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def test_pipeline_flow(tmp_path: Path, client: Client) -> None:
    state = reconstruction_pipeline(
        "digits",
        "seed",
        1,
        0,
        str(tmp_path / "work"),
        client.scheduler.address,
        None,
        return_state=True,
    )
    assert state.is_completed()
    summary = state.result()
    assert summary["images"] == 1797
    assert abs(summary["psnr_cost_db"]) < 0.2
    found = artifacts(state)
    assert {"pipeline-summary", "pipeline-preview"} <= set(found)
    _check_preview(found["pipeline-preview"])
    assert (tmp_path / "work" / "digits-seed-decoded" / "manifest.json").is_file()


def test_query_flow(mnist_store: Path, seed_model: Path) -> None:
    state = query_latents(
        str(mnist_store), near="mnist5k-00600", k=5, metric="cosine", model_dir=str(seed_model),
        return_state=True,
    )  # fmt: skip
    assert state.is_completed()
    results = state.result()
    assert len(results) == 5
    assert all(r["row"] != 600 for r in results)
    found = artifacts(state)
    table = json.loads(found["query-results"].data)
    assert [r["id"] for r in table] == [r["id"] for r in results]
    _check_preview(found["query-preview"])
    state = query_latents(str(mnist_store), rows="10:20", label=1, return_state=True)
    assert state.result() == []
    state = query_latents(str(mnist_store), worst=3, return_state=True)
    worst = state.result()
    psnrs = open_store(str(mnist_store)).read_quality(0, 5000)
    assert [r["row"] for r in worst] == np.argsort(psnrs, kind="stable")[:3].tolist()
    state = query_latents(str(mnist_store), where=["row >= 1"], return_state=True)
    assert len(state.result()) == 1000  # the first 1,000 of 4,999 rows


def test_find_anomalies_flow_leaves_the_scores_and_a_picture(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    reference, store = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    encode(tiny_model, "synthetic:120", reference, layout=Layout(32, 16), client=client)
    encode(tiny_model, "digits", store, layout=Layout(32, 16), limit=20, client=client)
    encode(tiny_model, "synthetic:60", store, append=True, client=client)
    state = find_anomalies(store, reference, str(tiny_model), 5, 0.95, 8, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["scored"] == 80 and summary["k"] == 5
    found = artifacts(state)
    top = json.loads(found["anomaly-top"].data)
    assert len(top) == 8
    assert [r["anomaly"] for r in top] == sorted((r["anomaly"] for r in top), reverse=True)
    assert sum(r["id"].startswith("digits") for r in top) >= 6  # the digits stand out
    _check_preview(found["anomaly-preview"])


def test_generate_and_manipulate_flows_leave_pictures(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    digits = str(tmp_path / "digits.zarr")
    encode(tiny_model, "digits", digits, layout=Layout(64, 32), limit=300, client=client)
    generated = str(tmp_path / "generated.zarr")
    state = generate_latents(digits, generated, str(tiny_model), 6, [2, 5], 3, 1.0, None, 1,
                             return_state=True)  # fmt: skip
    assert state.is_completed()
    assert state.result()["rows"] == 12 and open_store(generated).meta["lineage"]["seed"] == 3
    found = artifacts(state)
    assert json.loads(found["generate-summary"].data)[0]["store"] == generated
    _check_preview(found["generate-preview"])
    ids = open_store(digits).read_ids(0, 2)
    strip = str(tmp_path / "strip.zarr")
    state = manipulate_latents("interpolate", digits, strip, str(tiny_model), ids[0], ids[1],
                               5, workers=1, return_state=True)  # fmt: skip
    assert state.is_completed() and state.result()["rows"] == 5
    _check_preview(artifacts(state)["manipulate-preview"])
    shifted = str(tmp_path / "shifted.zarr")
    state = manipulate_latents("shift", digits, shifted, str(tiny_model), from_label=4,
                               to_label=9, workers=1, return_state=True)  # fmt: skip
    assert state.is_completed()
    assert open_store(shifted).meta["lineage"]["parameters"]["to_label"] == 9
    _check_preview(artifacts(state)["manipulate-preview"])
    state = manipulate_latents("interpolate", digits, str(tmp_path / "x.zarr"), str(tiny_model),
                               return_state=True)  # fmt: skip
    assert state.is_failed()
    assert "interpolate needs from_id and to_id" in str(state.message)


def test_import_flow_leaves_a_summary_and_a_picture(tmp_path: Path, kl_vae: Path) -> None:
    raw = np.random.default_rng(0).standard_normal((6, 4, 4, 4), dtype=np.float32) / 0.18215
    np.save(tmp_path / "raw.npy", raw)
    store = str(tmp_path / "imported.zarr")
    state = import_latents_flow(str(tmp_path / "raw.npy"), store, str(kl_vae), "scaled",
                                workers=1, return_state=True)  # fmt: skip
    assert state.is_completed()
    summary = state.result()
    assert summary["rows"] == 6 and summary["layout"] == "array"
    assert "look unscaled" in summary["warning"]  # raw latents declared scaled
    found = artifacts(state)
    assert json.loads(found["import-summary"].data)[0]["store"] == store
    _check_preview(found["import-preview"])


def test_nightly_decodes_derived_stores_and_stores_of_other_sizes(
    tmp_path: Path, tiny_model: Path, tiny_vae: Path, client: Client
) -> None:
    """A derived store is decoded like any other, and a store of another image size
    (a diffusers model's 32x32 RGB beside 16x16 grey digits) is decoded too but left out
    of the one preview picture, which holds images of one size."""
    from latentbatch.uses.generation import generate

    root, out_root, models = tmp_path / "stores", tmp_path / "decoded", tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny")
    shutil.copytree(tiny_vae, models / "taesd")
    encode(tiny_model, "digits", str(root / "digits.zarr"), limit=40, client=client)
    generate(str(root / "digits.zarr"), str(root / "samples.zarr"), count=4, client=client)
    encode(tiny_vae, "synthetic:6", str(root / "vae.zarr"), client=client)
    state = nightly_bulk_decode(str(root), str(out_root), str(models), "tar",
                                client.scheduler.address, None, return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    rows = {Path(r["store"]).stem: r for r in json.loads(artifacts(state)["nightly-summary"].data)}
    assert {name: r["action"] for name, r in rows.items()} == {
        "digits": "decoded", "samples": "decoded", "vae": "decoded"
    }  # fmt: skip
    preview = artifacts(state)["nightly-preview"]
    _check_preview(preview)
    assert "vae.zarr" not in preview.data and "digits.zarr" in preview.data
