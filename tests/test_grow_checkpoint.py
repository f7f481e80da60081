"""tools/grow_checkpoint.py: offline growth and re-sharding of real distributed checkpoints.

Sources are real torch_dist checkpoints of the tiny model saved at TP1xPP1 and at TP2xPP2; grown
checkpoints are loaded by real models at four layouts in a 4-process gloo world. Every bad input
is checked for its message and for leaving SRC and any existing DST byte-for-byte untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_step.checkpoint import load_full_tensors, read_meta, save_full_tensors
from megatron_step.forward import compute_logits
from megatron_step.growth import layer_key
from megatron_step.parallel import local_world

from builders import load_at_layout, random_tokens
from dist import run_world
from growth_builders import (
    GROWN_DEPTH,
    SOURCE_DEPTH,
    grow_offline,
    parallel,
    reshard_source,
    save_source,
    source_meta,
    target_model,
    tree_snapshot,
)
from tools import TOOLS, load_tool

TOOL = load_tool("grow_checkpoint")
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
QKV = "self_attention.linear_qkv.weight"


def _full_tensors(path: Path) -> dict[str, torch.Tensor]:
    """`checkpoint.load_full_tensors` from the test process (it needs a process group)."""
    with local_world():
        return load_full_tensors(path)


def grow(*argv: object) -> int:
    return TOOL.main([str(a) for a in argv] + ["--no-progress"])


def _make_sources(root: Path) -> None:
    """4 ranks: save the source at TP1xPP1 (DP=4), re-save it from TP2xPP2, and run the tool's
    torchrun mode (layers dealt over the 4 ranks) on the TP1xPP1 source."""
    save_source(root / "src11")
    reshard_source(root / "src11", root / "src22", 2, 2)
    grow_offline(root / "src11", root / "parallel", num_new_layers=GROWN_DEPTH - SOURCE_DEPTH,
                 tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def _logits_at_layouts(checkpoints: dict[str, tuple[Path, int]]) -> dict[str, torch.Tensor]:
    """Logits of each (checkpoint, depth) loaded at each of the four layouts."""
    tokens = random_tokens(target_model())
    logits = {}
    for name, (path, depth) in checkpoints.items():
        for tp, pp in LAYOUTS:
            _, gpt = load_at_layout(target_model(), depth, parallel(tp, pp), path)
            logits[f"{name} tp{tp}pp{pp}"] = compute_logits([gpt], tokens)
    return logits


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grow_checkpoint")
    run_world(_make_sources, 4, path)
    return path


@pytest.fixture(scope="module")
def grown(root: Path) -> dict[str, Path]:
    """4 -> 6 layers (interpolation_mean, upper) from both sources, and a zero_output one."""
    for name in ("src11", "src22"):
        assert grow(root / name, root / f"grown-{name}", "--num-layers", GROWN_DEPTH,
                    "--tp", 2, "--pp", 2) == 0
    assert grow(root / "src22", root / "zero", "--num-new-layers", 2, "--operator", "random",
                "--position", "lower", "--zero-output", "--seed", 3) == 0
    return {"src11": root / "grown-src11", "src22": root / "grown-src22", "zero": root / "zero"}


@pytest.fixture(scope="module")
def layout_logits(root: Path, grown: dict[str, Path]) -> dict[str, torch.Tensor]:
    checkpoints = {"source": (root / "src11", SOURCE_DEPTH),
                   **{name: (path, GROWN_DEPTH) for name, path in grown.items()}}
    results = run_world(_logits_at_layouts, 4, checkpoints)
    for rank, result in enumerate(results[1:], 1):
        for key, value in result.items():
            torch.testing.assert_close(value, results[0][key], atol=0, rtol=0,
                                       msg=lambda m, r=rank, k=key: f"rank {r} {k}: {m}")
    return results[0]


def test_help_describes_the_tool(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` exits 0 and documents the DST layout and the safety rules (module docstring)."""
    assert TOOL.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "layout-independent" in out and "--overwrite" in out and "--merge-adapters" in out


def test_grown_checkpoint_loads_at_every_layout(grown: dict[str, Path],
                                                layout_logits: dict[str, torch.Tensor]) -> None:
    """A checkpoint grown 4 -> 6 from a TP1xPP1 source loads at (1,1), (2,1), (1,2) and (2,2)
    with equal logits (1e-5); growing the same weights saved at TP2xPP2 gives a bit-identical
    checkpoint, hence the same logits: DST does not depend on how SRC was sharded."""
    a, b = _full_tensors(grown["src11"]), _full_tensors(grown["src22"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = layout_logits["src11 tp1pp1"]
    for name in ("src11", "src22"):
        for tp, pp in LAYOUTS:
            key = f"{name} tp{tp}pp{pp}"
            torch.testing.assert_close(layout_logits[key], first, atol=1e-5, rtol=0,
                                       msg=lambda m, k=key: f"{k}: {m}")
    assert (first - layout_logits["source tp1pp1"]).abs().max() > 1e-3  # growth did something


def test_zero_output_checkpoint_keeps_the_old_function(
        layout_logits: dict[str, torch.Tensor]) -> None:
    """Offline zero_output growth (random operator, lower position) of the TP2xPP2 source
    gives, at every layout, the 4-layer model's logits within 1e-5."""
    reference = layout_logits["source tp1pp1"]
    for tp, pp in LAYOUTS:
        torch.testing.assert_close(layout_logits[f"zero tp{tp}pp{pp}"], reference, atol=1e-5,
                                   rtol=0)


def test_mean_layers_exact_and_old_layers_bit_identical_on_disk(root: Path,
                                                                grown: dict[str, Path]) -> None:
    """Read back from disk: each new layer is exactly (W_j + W_{j+1}) / 2 for every tensor,
    the old layers and the non-layer tensors are bit-identical to SRC's; the metadata marks
    the new layers as born in stage 2 and the layout DST is meant for."""
    old, new = _full_tensors(root / "src11"), _full_tensors(grown["src11"])
    names = sorted(k.removeprefix("decoder.layers.0.") for k in old
                   if k.startswith("decoder.layers.0."))
    assert len(names) == 6 and len(new) == len(old) + 2 * len(names)
    for new_index, old_index in ((0, 0), (1, 1), (3, 2), (5, 3)):
        for name in names:
            assert torch.equal(new[layer_key(new_index, name)], old[layer_key(old_index, name)])
    for new_index, (j, k) in ((2, (1, 2)), (4, (2, 3))):
        for name in names:
            mean = (old[layer_key(j, name)] + old[layer_key(k, name)]) / 2
            assert torch.equal(new[layer_key(new_index, name)], mean), name
    for key in ("embedding.word_embeddings.weight", "output_layer.weight",
                "decoder.final_layernorm.weight"):
        assert torch.equal(new[key], old[key])
    meta = read_meta(grown["src11"])
    assert [e["born_stage"] for e in meta["layers"]] == [1, 1, 2, 1, 2, 1]
    assert meta["layers"][2]["source"] == "mean:1,2"
    assert (meta["num_layers"], meta["stage"], meta["kind"]) == (6, 2, "grown")
    assert meta["target_layout"] == {"tensor_model_parallel_size": 2,
                                     "pipeline_model_parallel_size": 2}
    assert meta["growth"]["new_layers"] == [2, 4] and meta["global_step"] == 10
    assert meta["model"]["num_layers"] == 8  # the run's target depth is kept


def test_torchrun_mode_matches_one_process(root: Path, grown: dict[str, Path]) -> None:
    """The 4-rank run (grown layers dealt over ranks, each saving its share) writes exactly
    the tensors and provenance of the one-process run."""
    one, many = _full_tensors(grown["src11"]), _full_tensors(root / "parallel")
    assert one.keys() == many.keys()
    assert [k for k in one if not torch.equal(one[k], many[k])] == []
    assert read_meta(root / "parallel")["layers"] == read_meta(grown["src11"])["layers"]


def test_tool_joins_a_real_torchrun_world(root: Path, grown: dict[str, Path],
                                          tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 tools/grow_checkpoint.py` joins torchrun's world from the
    environment (parallel.local_world) and writes the one-process result bit for bit. Guards
    against each rank growing alone in a world of one (DST would record world size 1 and be
    written twice)."""
    dst = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "tools/grow_checkpoint.py", str(root / "src11"), str(dst), "--num-layers",
               str(GROWN_DEPTH), "--tp", "2", "--pp", "2", "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU/gloo on every machine, as run_world
    result = subprocess.run(command, cwd=TOOLS.parent, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _full_tensors(grown["src11"]), _full_tensors(dst)
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    meta = read_meta(dst)
    assert meta["world_size"] == 2 and meta["layers"] == read_meta(grown["src11"])["layers"]
    assert result.stdout.count("wrote ") == 1  # progress and results from rank 0 only


def test_reshard_only_keeps_tensors(root: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--num-new-layers 0 converts a TP2xPP2 checkpoint to the layout-independent form with
    the same tensors, the same stage and provenance; no temporary directory is left behind."""
    assert grow(root / "src22", tmp_path / "flat", "--num-new-layers", 0, "--pp", 4) == 0
    a, b = _full_tensors(root / "src11"), _full_tensors(tmp_path / "flat")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_meta(tmp_path / "flat")
    assert (meta["num_layers"], meta["stage"], meta["growth"]["num_new_layers"]) == (4, 1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat"]
    out = capsys.readouterr().out
    assert "num_new_layers=0" in out.splitlines()[0] and "wrote" in out


def test_plan_stage_gives_depth_and_growth_settings(root: Path, tmp_path: Path) -> None:
    """--plan PLAN --stage 2 takes the depth and growth settings of the plan's stage 2;
    command-line growth flags override the plan's."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"stages": [
        {"num_layers": 4, "train_steps": 10},
        {"num_layers": 7, "train_steps": 10, "growth": {"operator": "copy", "position": "lower"}},
        {"num_layers": 8, "train_steps": 10}]}))
    assert grow(root / "src11", tmp_path / "a", "--plan", plan, "--stage", 2) == 0
    meta = read_meta(tmp_path / "a")
    assert meta["num_layers"] == 7 and meta["growth"]["operator"] == "copy"
    assert [e["source"] for e in meta["layers"]] == ["init", "copy:0", "init", "copy:1", "init",
                                                     "copy:2", "init"]
    assert grow(root / "src11", tmp_path / "b", "--plan", plan, "--stage", 2,
                "--operator", "random") == 0
    assert read_meta(tmp_path / "b")["growth"]["operator"] == "random"


def test_dry_run_prints_plan_and_writes_nothing(root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run echoes the arguments, prints which old layer or recipe each grown layer comes
    from, and creates nothing."""
    assert grow(root / "src11", tmp_path / "dst", "--num-new-layers", 2, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "2 <- NEW mean:1,2 (born in stage 2)" in out and "dry run: nothing written" in out
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_existing_checkpoint(root: Path, tmp_path: Path) -> None:
    """With --overwrite an existing DST checkpoint is replaced by the new one."""
    assert grow(root / "src11", tmp_path / "dst", "--num-new-layers", 0) == 0
    assert grow(root / "src11", tmp_path / "dst", "--num-new-layers", 1, "--overwrite") == 0
    assert read_meta(tmp_path / "dst")["num_layers"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def _adapter_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """SRC's tensors plus unmerged LoRA (rank 4, alpha 8) on layer 1's linear_qkv, saved."""
    tensors = _full_tensors(src)
    generator = torch.Generator().manual_seed(5)
    tensors[layer_key(1, "self_attention.linear_qkv.lora_a.weight")] = torch.randn(
        4, 64, generator=generator)
    tensors[layer_key(1, "self_attention.linear_qkv.lora_b.weight")] = torch.randn(
        128, 4, generator=generator)
    adapters = {"rank": 4, "alpha": 8.0, "targets": ["linear_qkv"], "layers": [1]}
    with local_world():
        save_full_tensors(dst, tensors, {**source_meta(), "adapters": adapters})
    return tensors


def test_merge_adapters_folds_lora_before_growing(root: Path, tmp_path: Path) -> None:
    """--merge-adapters folds W += (alpha/rank) B @ A into the base weight before growth, so
    both the moved layer and the new mean layer reading it see the merged weight."""
    tensors = _adapter_checkpoint(root / "src11", tmp_path / "lora")
    assert grow(tmp_path / "lora", tmp_path / "dst", "--num-new-layers", 2,
                "--merge-adapters") == 0
    new = _full_tensors(tmp_path / "dst")
    assert not any("lora" in k for k in new)
    lora_a = tensors[layer_key(1, "self_attention.linear_qkv.lora_a.weight")]
    lora_b = tensors[layer_key(1, "self_attention.linear_qkv.lora_b.weight")]
    merged = tensors[layer_key(1, QKV)] + 2.0 * lora_b @ lora_a
    torch.testing.assert_close(new[layer_key(1, QKV)], merged, atol=1e-6, rtol=0)
    torch.testing.assert_close(new[layer_key(2, QKV)], (merged + tensors[layer_key(2, QKV)]) / 2,
                               atol=1e-6, rtol=0)
    assert read_meta(tmp_path / "dst")["adapters"] is None


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line message, exit code 2, SRC and an existing DST untouched


def _drop_file(src: Path, tmp: Path) -> tuple[Path, str]:
    broken = tmp / "broken"
    shutil.copytree(src, broken)
    victim = sorted(broken.glob("*.distcp"))[-1]
    victim.unlink()
    return broken, f"{victim.name}: missing"


def _truncate_file(src: Path, tmp: Path) -> tuple[Path, str]:
    broken = tmp / "broken"
    shutil.copytree(src, broken)
    victim = sorted(broken.glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    return broken, f"{victim.name}: truncated"


def _drop_meta(src: Path, tmp: Path) -> tuple[Path, str]:
    broken = tmp / "broken"
    shutil.copytree(src, broken)
    (broken / "megatron_step.json").unlink()
    return broken, "megatron_step.json: missing"


def _drop_key(src: Path, tmp: Path, key: str) -> Path:
    tensors = _full_tensors(src)
    del tensors[key]
    with local_world():
        save_full_tensors(tmp / "broken", tensors, source_meta())
    return tmp / "broken"


def _unmerged_adapters(src: Path, tmp: Path) -> tuple[Path, str]:
    _adapter_checkpoint(src, tmp / "lora")
    return tmp / "lora", (r"unmerged LoRA adapters \(decoder.layers.1.self_attention.linear_qkv"
                          r".lora_a.weight, \.\.\.\); pass --merge-adapters")


def _not_a_checkpoint(src: Path, tmp: Path) -> tuple[Path, str]:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("not a checkpoint")
    return tmp / "notes", "not a megatron_step checkpoint"


BAD_SOURCES = {
    "src-missing": lambda src, tmp: (tmp / "nowhere", "does not exist"),
    "src-file-missing": _drop_file,
    "src-file-truncated": _truncate_file,
    "src-metadata-missing": _drop_meta,
    "src-key-missing": lambda src, tmp: (
        _drop_key(src, tmp, layer_key(3, "mlp.linear_fc2.weight")),
        "tensor decoder.layers.3.mlp.linear_fc2.weight: missing from the index"),
    "src-not-gpt": lambda src, tmp: (
        _drop_key(src, tmp, "embedding.word_embeddings.weight"),
        "tensor embedding.word_embeddings.weight: missing from the index"),
    "src-not-checkpoint": _not_a_checkpoint,
    "src-unmerged-adapters": _unmerged_adapters,
}
BAD_REQUESTS = {  # (extra arguments, message), against the good TP1xPP1 source
    "depth-smaller": (["--num-layers", "3"], "target depth 3 is smaller than SRC's 4 layers"),
    "pp-over-layers": (["--num-layers", "5", "--pp", "8"], "8 pipeline stages > 5 layers"),
    "tp-not-dividing-heads": (["--num-new-layers", "2", "--tp", "3"],
                              r"3 does not divide model.num_attention_heads \(4\)"),
    "plan-without-stage": (["--plan", "plan.yaml"], "--plan: needs --stage"),
    "stage-not-later": (["--num-new-layers", "1", "--stage", "1"],
                        "--stage: .*born after the old ones"),
    "bad-position": (["--num-new-layers", "2", "--position", "1,9"],
                     r"growth.position: indices must lie in \[0, 6\)"),
}


def _assert_refused(argv: list[object], match: str, watched: list[Path],
                    capsys: pytest.CaptureFixture[str]) -> None:
    before = {path: tree_snapshot(path) for path in watched}
    assert grow(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("grow_checkpoint.py: error: "), err
    assert re.search(match, err), err
    for path in watched:
        assert tree_snapshot(path) == before[path], f"{path} changed"


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_is_refused_untouched(case: str, root: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A missing, incomplete (file or key named), foreign or adapter-carrying SRC is refused
    with one line naming the problem (and --merge-adapters as the way out); SRC is unchanged
    and no DST appears."""
    src, match = BAD_SOURCES[case](root / "src11", tmp_path)
    _assert_refused([src, tmp_path / "dst", "--num-new-layers", 2], match, [src], capsys)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_refused_untouched(case: str, root: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An impossible depth, layout, stage or position is refused before anything is written;
    SRC is unchanged and no DST appears."""
    extra, match = BAD_REQUESTS[case]
    _assert_refused([root / "src11", tmp_path / "dst", *extra], match, [root / "src11"], capsys)
    assert not (tmp_path / "dst").exists()


def test_existing_destinations_are_refused_untouched(root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An existing DST needs --overwrite; DST = SRC is refused even with it (SRC is never
    modified); a non-checkpoint directory is never replaced. Nothing changes on disk."""
    src = root / "src11"
    assert grow(src, tmp_path / "dst", "--num-new-layers", 0) == 0
    _assert_refused([src, tmp_path / "dst", "--num-new-layers", 2],
                    "exists; pass --overwrite to replace it", [src, tmp_path / "dst"], capsys)
    _assert_refused([src, src, "--num-new-layers", 2, "--overwrite"],
                    "must lie outside SRC", [src], capsys)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    _assert_refused([src, tmp_path / "data", "--num-new-layers", 2, "--overwrite"],
                    "is not a megatron_step checkpoint; refusing", [src, tmp_path / "data"],
                    capsys)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse errors (no target depth, two targets, a bad position) exit 2 with one line."""
    for argv in (["a", "b"], ["a", "b", "--num-layers", "6", "--num-new-layers", "2"],
                 ["a", "b", "--num-layers", "6", "--position", "middle"]):
        assert TOOL.main(argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
