"""Checkpoint inspection: a faithful description of a real TP2xPP2 stage-2 checkpoint, and every
kind of damage reported by name with a non-zero exit code."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_hf import train_and_save
from torch.distributed.checkpoint import FileSystemReader

from megatron_step.checkpoint import META_FILE, load_full_tensors
from megatron_step.parallel import local_world

from dist import run_world
from tools import load_tool

INSPECT = load_tool("inspect_checkpoint")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 checkpoint saved at TP2 x PP2 with DistOpt state: layers 0-1 frozen under
    LoRA (born in stage 1), layers 2-3 trainable (born in stage 2)."""
    path = tmp_path_factory.mktemp("inspect") / "stage2"
    run_world(train_and_save, 4, path, 2, 2, 2, True, True)
    return path


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = INSPECT.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_describes_a_complete_checkpoint(stage2: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--json reports the checkpoint complete, with the saved stage, layout, optimizer state,
    per-layer provenance (frozen + LoRA vs trainable) and tensor shapes equal to the shapes
    of the tensors actually loaded (adapters included); the text form says the same."""
    code, out, _ = _inspect(capsys, str(stage2), "--json")
    assert code == 0
    desc = json.loads(out)
    assert desc["complete"] is True and desc["problems"] == []
    assert (desc["kind"], desc["stage"], desc["global_step"], desc["num_layers"]) == (
        "train", 2, 3, 4)
    assert desc["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                              "world_size": 4}
    assert desc["has_optimizer"] is True and desc["optimizer_items"] > 0
    assert [(r["born_stage"], r["source"], r["trainable"], r["adapters"])
            for r in desc["layers"]] == [(1, "init", False, True), (1, "init", False, True),
                                         (2, "copy:1", True, False), (2, "copy:1", True, False)]
    with local_world():
        loaded = load_full_tensors(stage2)
    assert {k: v["shape"] for k, v in desc["tensors"].items()} == {
        k: list(v.shape) for k, v in loaded.items()}
    assert desc["tensors"]["decoder.layers.0.mlp.linear_fc1.lora_b.weight"]["shape"] == [256, 4]
    assert desc["parameters"] == sum(math.prod(v.shape) for v in loaded.values())

    code, text, _ = _inspect(capsys, str(stage2))
    assert code == 0
    for expected in ("status       complete", "stage 2", "TP=2 PP=2 (world 4)",
                     "LoRA rank 4", "frozen + LoRA", "decoder.layers.{0-3}.mlp.linear_fc2.weight"):
        assert expected in text, expected


def _delete(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes((path / name).read_bytes()[:keep])


def _garble(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(b"\x80\x04garbage" * 50)


def _deepen(path: Path) -> None:
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "num_layers": 5,
                                              "layers": meta["layers"] + [meta["layers"][-1]]}))


DAMAGE = {
    "shard-deleted": (_delete("__1_0.distcp"), "__1_0.distcp: missing"),
    "shard-truncated": (_truncate("__2_1.distcp", 100), "__2_1.distcp: truncated"),
    "index-truncated": (_truncate(".metadata", 200), ".metadata: unreadable"),
    "index-garbled": (_garble(".metadata"), ".metadata: unreadable"),
    "index-deleted": (_delete(".metadata"), ".metadata: missing"),
    "meta-deleted": (_delete(META_FILE), f"{META_FILE}: missing"),
    "meta-truncated": (_truncate(META_FILE, 40), f"{META_FILE}: unreadable"),
    "common-deleted": (_delete("common.pt"), "common.pt: missing"),
    "common-garbled": (_garble("common.pt"), "common.pt: unreadable"),
    "backend-deleted": (_delete("metadata.json"), "metadata.json: missing"),
    "meta-claims-more-layers": (_deepen, "tensor decoder.layers.4.self_attention.linear_qkv"
                                         ".weight: missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_reported_by_name(stage2: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """Each kind of damage (lost or truncated shard, truncated/garbled/missing index, missing
    or truncated metadata, missing/garbled common.pt or metadata.json, metadata describing
    tensors that are not there) gives exit 1 and an error line naming the file or tensor,
    in both text and JSON output; nothing is reported complete."""
    broken = tmp_path / "ckpt"
    shutil.copytree(stage2, broken)
    apply, named = DAMAGE[damage]
    apply(broken)
    code, _, err = _inspect(capsys, str(broken))
    assert code == 1
    assert named in err, err
    code, out, _ = _inspect(capsys, str(broken), "--json")
    desc = json.loads(out)
    assert code == 1 and desc["complete"] is False
    assert any(named in problem for problem in desc["problems"])


def test_deep_check_reads_the_data(stage2: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes overwritten inside a shard keep every file the right size (the metadata checks
    pass) but --deep reads the tensors and reports the damaged one; an intact checkpoint
    passes --deep."""
    assert _inspect(capsys, str(stage2), "--deep")[0] == 0
    broken = tmp_path / "ckpt"
    shutil.copytree(stage2, broken)
    storage = FileSystemReader(str(broken)).read_metadata().storage_data
    info = next(info for index, info in storage.items()
                if index.fqn == "embedding.word_embeddings.weight")
    with open(broken / info.relative_path, "r+b") as stream:
        stream.seek(info.offset + info.length // 2)
        stream.write(b"\xff" * 64)
    assert _inspect(capsys, str(broken))[0] == 0
    code, _, err = _inspect(capsys, str(broken), "--deep")
    assert code == 1
    assert "embedding.word_embeddings.weight" in err or "tensor data" in err, err


def test_missing_directory_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist is an incomplete checkpoint named in the error (exit 1);
    --help exits 0."""
    code, _, err = _inspect(capsys, str(tmp_path / "nope"))
    assert code == 1 and "nope" in err
    assert INSPECT.main(["--help"]) == 0
