"""lm-evaluation-harness on an exported checkpoint, with a task defined from local files, scored
against tools/evaluate.py on the same tokens.

Needs `lm-eval[hf]` (`pip install -e '.[eval]'`, 77 s on top of the test extras); marked
`lm_eval` and reported as not run where it is missing. The comparison is exact by
construction: lm-eval's rolling log-likelihood scores each document on its own, from a prefix
token (here the tokenizer's EOD, as the export has no BOS), in windows of the model's
max_position_embeddings (= seq_length); tools/evaluate.py joins documents with EOD and scores
overlapping windows of seq_length + 1 tokens across document boundaries. With documents of
seq_length - 1 tokens whose text ends in the EOD token, and a leading EOD in evaluate.py's
data, every evaluate.py window [EOD, doc, EOD] is exactly one lm-eval window (context
[EOD, doc], labels [doc, EOD]). On ordinary documents the two numbers differ by that windowing
(README, "Evaluating with lm-evaluation-harness").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_step.checkpoint import save_checkpoint
from megatron_step.config import OptimizerConfig, ParallelConfig, model_preset
from megatron_step.data.corpus import to_jsonl
from megatron_step.data.sources import read_documents
from megatron_step.data.tokenizer import BPE_EOD, load_tokenizer, train_bpe
from megatron_step.forward import train_step
from megatron_step.optim import wrap_and_optimize

from builders import FP32, build_world_model, microbatches
from dist import run_world
from tools import load_tool

pytestmark = pytest.mark.lm_eval
SEQ, VOCAB, DOCS = 64, 384, 6
EVALUATE, EXPORT = load_tool("evaluate"), load_tool("export_hf")
TASK = """task: megatron_step_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _train_and_save(path: Path, texts: list[list[int]]) -> None:
    """The tiny LLaMA with a 384-id vocabulary, 30 steps on the given token rows, saved."""
    model = model_preset("tiny", vocab_size=VOCAB)
    _, gpt = build_world_model(model, model.num_layers, ParallelConfig())
    chunks, optimizer = wrap_and_optimize([gpt], ParallelConfig(), FP32, OptimizerConfig(),
                                          lr=3e-3)
    rows = torch.tensor(texts)
    for step in range(30):
        train_step(chunks, optimizer, microbatches(rows[step % 4::4][:4]))
    save_checkpoint(path, [gpt], {
        "model": dataclasses.asdict(model), "num_layers": model.num_layers, "stage": 1,
        "stage_step": 30, "global_step": 30, "kind": "stage_end", "precision": "fp32",
        "adapters": None, "layers": [{"born_stage": 1, "source": "init"}] * model.num_layers})


def _exact_documents(tokenizer, text: str, count: int) -> list[str]:
    """`count` texts of exactly SEQ - 1 tokens that re-tokenize to themselves, also followed by
    the EOD token's text (and, for the first, preceded by it)."""
    ids = tokenizer.encode(text)
    found = []
    for start in range(0, len(ids) - SEQ, SEQ):
        piece = tokenizer.decode(ids[start:start + SEQ - 1])
        if (tokenizer.encode(piece) == ids[start:start + SEQ - 1]
                and tokenizer.encode(piece + BPE_EOD) == [*ids[start:start + SEQ - 1],
                                                          tokenizer.eod]
                and tokenizer.encode(BPE_EOD + piece)[1:] == ids[start:start + SEQ - 1]):
            found.append(piece)
        if len(found) == count:
            return found
    raise AssertionError("not enough re-tokenizable pieces")


def test_lm_eval_on_the_export_matches_tools_evaluate(wikitext: Path, tmp_path: Path) -> None:
    """`lm_eval --model hf --model_args pretrained=<export>` runs a perplexity task defined
    from a local JSONL (no hub download) on a checkpoint exported with its BPE tokenizer, and
    its total log-likelihood equals tools/evaluate.py's mean NLL x tokens on the same windows
    (1e-5 relative; fp32). Guards the export (weights, tokenizer, EOD, no BOS, max length)
    for the harness users run, and the documented difference between the two numbers."""
    text = "".join(read_documents(wikitext / "valid.txt", document_format="wikitext"))
    bpe = train_bpe([text[:200_000]], VOCAB - 16, tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(bpe.spec)
    ids = tokenizer.encode(text[200_000:260_000])
    ckpt = tmp_path / "ckpt"
    run_world(_train_and_save, 1, ckpt, [ids[i:i + SEQ] for i in range(0, 32 * SEQ, SEQ)])
    hf = tmp_path / "hf"
    assert EXPORT.main([str(ckpt), str(hf), "--tokenizer", bpe.spec]) == 0

    documents = _exact_documents(tokenizer, text[260_000:300_000], DOCS)
    (tmp_path / "evaluate.jsonl").write_text(to_jsonl([BPE_EOD + documents[0],
                                                       *documents[1:]]))
    out = tmp_path / "evaluate.json"
    assert EVALUATE.main([str(ckpt), "--data", str(tmp_path / "evaluate.jsonl"), "--tokenizer",
                          bpe.spec, "--output", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["tokens"] == DOCS * SEQ

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    lm_docs = [doc + BPE_EOD for doc in documents]
    (task_dir / "docs.jsonl").write_text(to_jsonl(lm_docs))
    (task_dir / "megatron_step_local_ppl.yaml").write_text(TASK.format(
        data=task_dir / "docs.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    subprocess.run([str(lm_eval), "--model", "hf", "--model_args",
                    f"pretrained={hf},dtype=float32", "--tasks", "megatron_step_local_ppl",
                    "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
                    "--output_path", str(tmp_path / "lm_eval")],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    [result_file] = (tmp_path / "lm_eval").rglob("results_*.json")
    result = json.loads(result_file.read_text())["results"]["megatron_step_local_ppl"]
    total_bytes = sum(len(doc.encode()) for doc in lm_docs)
    total_nll = result["bits_per_byte,none"] * math.log(2) * total_bytes
    assert total_nll / (DOCS * SEQ) == pytest.approx(ours["loss"], rel=1e-5)
