"""Behaviour kept across releases: a small seeded run (a seeded random-init model, 40
synthetic shapes encoded, the store decoded to tar-of-PNG shards) must give the bytes
recorded here. The sha256s were recorded with the code before the library moved into
folders (issue 29); a change that alters a store's or an output's bytes fails here and
must say so (and record new sums) on purpose."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from distributed import Client

from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.models.autoencoder import Autoencoder
from latentbatch.models.weights import save_model
from latentbatch.stores.store import Layout
from tests.helpers import tiny_model_config

MODEL_ID = "a59b33bf6cd61a1710d928e5127b07bffff6424bccb8a6f84ef5898ea2bfe62b"
STORE_FILES = {
    "ids/c/0": "d904c2fe94747f0d04e162559420cad31812c00a2877f585686552ea770d8562",
    "ids/c/1": "fed51c17dbbbfba5607ebf6a63a9141c9b160c3c88f0a60ce08c4713a38343d7",
    "ids/c/2": "be5342d86048c4b106c9513de3b8aa878b0d55034e49765e7e009a078152d6d5",
    "ids/zarr.json": "a2e82f334126413300dca15cb282e27cc570d405cf96d0d6dbef340c640322cb",
    "labels/c/0": "b3b3f12118305b1d2750266f988327a2dbd898ab67b65e52ff364df5c6551cf8",
    "labels/c/1": "bb20afa7de1cfee24f6cc196bffeee22bb1ea7e2109f763f36a753a73781b43f",
    "labels/c/2": "3ea7d76f260279181d05a6e1330375f560ad9cd34368e8b3ffd2f550e05cf70d",
    "labels/zarr.json": "7a230ef25e1d44e5776e7fec24d5064a81d71fe706f1664a57073b1bbd62d700",
    "latents/c/0/0/0/0": "6e947bd80552f7cfa0e881ae06d54ed393cf5a00e6709c945fd2b64ecab1464c",
    "latents/c/1/0/0/0": "bfd80832916916dcda80e9fdd36ca29b2f7510852de356654bd80600140e9825",
    "latents/c/2/0/0/0": "a598da24d9b6a734a95fb4718ba497db24dee22523e021a48c396f6887116ce8",
    "latents/zarr.json": "97b0161d8f95edc2154a92531c219e8bd8bf9e9e3176c26c9cb32a6eea80887f",
    "quality/c/0": "57faa3a51f874079a52693eb610435464c2200ce23a95aefd22a131c19d01425",
    "quality/c/1": "1bf6bf4540953f73eb537ee392c023302a8a8a8e071b679333e03e1d90be96f5",
    "quality/c/2": "e9d7aa9866820fa77422332f9eec4e799ef7795bcbcc403d10971f27dd80192a",
    "quality/zarr.json": "712339a3b474c424595a97ad80ce58511af68b9b139c85a6ba2b326c8d55d01b",
}
OUTPUT_SHARDS = {
    "shard-000000.tar": "8f39c3843a63d9f60f3637251408ea5f375fce1c5f39da90bfc15cc9f3e9eb47",
    "shard-000001.tar": "ebc0327f110b68d57af31c84e152c89bb034c7c4e2534c496b506976974ba6f5",
    "shard-000002.tar": "98473c915788353c9e247c080285e6d1881ef39e5c0d2a941c4516e48e26f3e4",
}


def _sums(folder: Path, files: list[Path]) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(files)
    }


def test_a_seeded_encode_and_decode_give_the_recorded_bytes(tmp_path: Path, client: Client) -> None:
    torch.manual_seed(0)
    model = Autoencoder(tiny_model_config())
    model_dir = tmp_path / "model"
    assert save_model(model_dir, model, {}) == MODEL_ID
    store = tmp_path / "store.zarr"
    encode(model_dir, "synthetic:40", str(store), layout=Layout(shard_rows=16, chunk_rows=8),
           client=client)  # fmt: skip
    # every array's metadata and chunks but the canary's (its rows are seeded by the
    # store's uuid) and the group's metadata (the uuid, the time)
    files = [p for p in store.rglob("*") if p.is_file() and p.parent != store]
    assert _sums(store, [p for p in files if "canary" not in p.parts]) == STORE_FILES
    out = tmp_path / "out"
    decode(model_dir, str(store), str(out), images_per_shard=16, client=client)
    assert _sums(out, list(out.glob("shard-*"))) == OUTPUT_SHARDS
