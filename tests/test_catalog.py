from __future__ import annotations

import shutil
from pathlib import Path

import zarr
from distributed import Client

from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.models.checkpoint import model_id
from latentbatch.outputs.catalog import (
    describe_stores,
    find_stores,
    models_by_id,
    output_url,
    plan_bulk,
)
from latentbatch.stores.store import Layout


def test_find_stores_and_plan_a_bulk_decode(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    root, out_root = tmp_path / "stores", tmp_path / "decoded"
    layout = Layout(16, 8)
    for name in ("a.zarr", "night/b.zarr", "night/c.zarr"):
        encode(tiny_model, "synthetic:20", str(root / name), layout=layout, client=client)
    zarr.open_group(str(root / "plain.zarr"), mode="w")  # a Zarr group, not a store
    (root / "notes").mkdir()
    (root / "notes" / "x.txt").write_text("hi")

    entries = find_stores(str(root))
    assert [e.relative for e in entries] == ["a.zarr", "night/b.zarr", "night/c.zarr"]
    assert all(e.count == 20 for e in entries)
    assert output_url(entries[1], str(out_root)) == str(out_root / "night" / "b")

    decode(tiny_model, str(root / "a.zarr"), str(out_root / "a"), client=client)
    decode(tiny_model, str(root / "night/b.zarr"), str(out_root / "night/b"), client=client)
    encode(tiny_model, "digits", str(root / "night/b.zarr"), append=True, limit=5, client=client)
    decode(tiny_model, str(root / "a.zarr"), str(out_root / "night/c"), client=client)

    plan = {i.entry.relative: i.status for i in plan_bulk(str(root), str(out_root))}
    assert plan == {"a.zarr": "complete", "night/b.zarr": "stale", "night/c.zarr": "foreign"}
    shutil.rmtree(out_root / "night" / "c")
    assert [i.needs_decode for i in plan_bulk(str(root), str(out_root))] == [False, True, True]


def test_missing_root_has_no_stores(tmp_path: Path) -> None:
    assert find_stores(str(tmp_path / "nothing")) == []


def test_models_by_id(tmp_path: Path, tiny_model: Path) -> None:
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / "config.json").write_text("{}")
    found = models_by_id(str(tmp_path / "models"))
    assert found == {model_id(tiny_model): str(tmp_path / "models" / "tiny")}
    assert models_by_id(str(tmp_path / "none")) == {}


def test_damaged_stores_are_listed_as_damaged(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    root, out_root = tmp_path / "stores", tmp_path / "decoded"
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        encode(tiny_model, "synthetic:20", str(root / name), layout=Layout(16, 8), client=client)
    (root / "a.zarr" / "zarr.json").write_text("{ damaged")  # the group's own metadata
    (root / "b.zarr" / "latents" / "zarr.json").write_text("[]")  # an array's metadata
    (out_root / "c").mkdir(parents=True)
    (out_root / "c" / "manifest.json").write_text('{"format": 1, "store": "x"}')

    assert [(e.relative, e.damage is not None) for e in find_stores(str(root))] == [
        ("a.zarr", True),
        ("b.zarr", False),
        ("c.zarr", False),
    ]
    rows = describe_stores(str(root), str(out_root))
    assert [r["store"] for r in rows] == [str(root / n) for n in ("a.zarr", "b.zarr", "c.zarr")]
    assert "zarr.json" in rows[0]["damaged"]
    assert "latents" in rows[1]["damaged"]
    assert rows[2]["damaged"] is None and rows[2]["output"] == "damaged"
    plan = plan_bulk(str(root), str(out_root))
    assert [i.status for i in plan] == ["damaged", "missing", "foreign"]
    assert "not a latentbatch manifest" in str(plan[2].detail)
