"""tools/evaluate.py: perplexity defined independently of Megatron (the exported HF model on the
same windows gives the same number), identical at every layout, from text or indexed data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_hf import train_and_save

from megatron_step.config import ParallelConfig
from megatron_step.data import build_indexed_dataset
from megatron_step.data.corpus import to_jsonl
from megatron_step.data.tokenizer import load_tokenizer
from megatron_step.evaluation import evaluate_checkpoint, read_token_stream

from dist import run_world
from tools import load_tool

SEQ = 64  # the tiny preset's seq_length
EVALUATE, EXPORT = load_tool("evaluate"), load_tool("export_hf")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, wikitext: Path) -> dict[str, Any]:
    """A trained tiny checkpoint, WikiText-2 validation paragraphs as JSONL, and the
    single-process evaluation of one on the other (micro-batch 3: a remainder exists)."""
    root = tmp_path_factory.mktemp("evaluate")
    ckpt = root / "ckpt"
    run_world(train_and_save, 1, ckpt, 1, 1, 2, False)
    lines = (wikitext / "valid.txt").read_text(encoding="utf-8").splitlines()
    documents = [line for line in lines if len(line.strip()) > 40][:12]
    data = root / "valid.jsonl"
    data.write_text(to_jsonl(documents), encoding="utf-8")
    out = root / "result.json"
    assert EVALUATE.main([str(ckpt), "--data", str(data), "--tokenizer", "byte",
                          "--micro-batch-size", "3", "--output", str(out)]) == 0
    return {"ckpt": ckpt, "data": data, "documents": documents, "root": root,
            "result": json.loads(out.read_text())}


def _hf_nll(ckpt: Path, documents: list[str], hf_dir: Path) -> tuple[float, int]:
    """(mean NLL, scored tokens) of the exported model, windows built here from the docs."""
    from transformers import LlamaForCausalLM

    stream = torch.tensor([b for doc in documents for b in [*doc.encode(), 0]])
    rows = torch.stack([stream[i * SEQ:i * SEQ + SEQ + 1]
                        for i in range((len(stream) - 1) // SEQ)])
    assert len(rows) % 3 != 0, "the data should leave a partial micro-batch"
    assert EXPORT.main([str(ckpt), str(hf_dir)]) == 0
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(hf_dir).eval()(rows[:, :-1]).logits
    nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    return nll.item(), rows[:, 1:].numel()


@pytest.mark.parametrize("adapted", [False, True], ids=["stage1", "stage2-unmerged-lora"])
def test_perplexity_equals_exp_mean_nll_of_the_exported_model(setup: dict[str, Any],
                                                              tmp_path: Path,
                                                              adapted: bool) -> None:
    """Perplexity = exp(mean token NLL) of the exported HF model over the documented windows:
    documents as bytes, each closed by EOD (0), concatenated, cut into non-overlapping windows
    of seq_length + 1 tokens, every label scored (1e-4 relative); unmerged LoRA adapters count
    (the export merges them). Guards the definition, the weighting of a partial last
    micro-batch, the loss reduction and adapter loading."""
    result, ckpt = setup["result"], setup["ckpt"]
    if adapted:
        ckpt, out = tmp_path / "ckpt", tmp_path / "result.json"
        run_world(train_and_save, 1, ckpt, 1, 1, 2, True)
        assert EVALUATE.main([str(ckpt), "--data", str(setup["data"]), "--tokenizer", "byte",
                              "--micro-batch-size", "3", "--output", str(out)]) == 0
        result = json.loads(out.read_text())
    nll, tokens = _hf_nll(ckpt, setup["documents"], tmp_path / "hf")
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["checkpoint"] == str(ckpt) and result["data"] == str(setup["data"])
    assert result["stage"] == (2 if adapted else 1)


def _evaluate_rank(ckpt: Path, data: Path, tp: int, pp: int) -> dict[str, Any]:
    stream = read_token_stream(data, load_tokenizer("byte"))
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return evaluate_checkpoint(ckpt, stream, parallel=parallel, micro_batch_size=2,
                               progress=False)


@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (1, 2)], ids=["tp2pp2", "pp2-dp2"])
def test_every_layout_gives_the_same_perplexity(setup: dict[str, Any], tp: int,
                                                pp: int) -> None:
    """On 4 processes at TP2 x PP2, and at PP2 x DP2 (windows split over data-parallel ranks,
    the remainder scored by all), every rank reports the single-process loss (1e-5)."""
    results = run_world(_evaluate_rank, 4, setup["ckpt"], setup["data"], tp, pp)
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(setup["result"]["loss"], rel=1e-5), rank
        assert result["tokens"] == setup["result"]["tokens"], rank
        assert result["layout"]["data_parallel_size"] == 4 // (tp * pp)


def test_indexed_dataset_gives_the_text_result(setup: dict[str, Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The same documents preprocessed into an indexed dataset (EOD appended) evaluate to the
    same loss without naming a tokenizer, and --max-tokens limits the windows read."""
    prefix = setup["root"] / "valid"
    build_indexed_dataset([setup["data"]], prefix, load_tokenizer("byte"), progress=False)
    assert EVALUATE.main([str(setup["ckpt"]), "--data", str(prefix)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(setup["result"]["loss"], rel=1e-6)
    assert result["tokens"] == setup["result"]["tokens"]
    assert EVALUATE.main([str(setup["ckpt"]), "--data", str(prefix),
                          "--max-tokens", str(3 * SEQ + 1)]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 3


def test_bad_input_is_named(setup: dict[str, Any], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """Too little text, text without a tokenizer, a damaged checkpoint and an existing --output
    fail with a message naming the input (exit 1, or 2 for the usage error); --help exits 0."""
    short = tmp_path / "short.jsonl"
    short.write_text(to_jsonl(["too short"]))
    ckpt = str(setup["ckpt"])
    cases = [([ckpt, "--data", str(short), "--tokenizer", "byte"], 1, "seq_length + 1"),
             ([ckpt, "--data", str(setup["data"])], 1, "--tokenizer"),
             ([str(tmp_path), "--data", str(setup["data"]), "--tokenizer", "byte"], 1,
              "megatron_step.json"),
             ([ckpt, "--data", str(short), "--output", str(short)], 2, "--output")]
    for argv, code, named in cases:
        assert EVALUATE.main(argv) == code, argv
        assert named in capsys.readouterr().err, argv
    assert EVALUATE.main(["--help"]) == 0
