"""Data blends through Megatron's BlendedMegatronDatasetBuilder, token accounting per stage and
dataset, the errors that replace Megatron's asserts and hangs, and the DataLoader that serves the
same micro-batches as the synchronous reader (issue 18, 8a)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zstandard
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_step import data
from megatron_step.config import BlendEntry, DataConfig, SplitBlends
from megatron_step.data.corpus import to_jsonl
from megatron_step.data.sources import read_documents
from megatron_step.data.tokenizer import load_tokenizer, train_bpe

from runs import REPO, run_ok, train_command
from tools import load_tool

SEQ, GBS, MBS = 32, 8, 2


@pytest.fixture(scope="module")
def corpora(wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Byte-level datasets: `wiki-0000{0,1,2}-of-00003` (3 x 15 WikiText-2 valid paragraphs,
    ~27 KB) and `topics` (the embedded corpus, ~480 KB)."""
    root = tmp_path_factory.mktemp("corpora")
    tok = load_tokenizer("byte")
    paragraphs = [p for p in read_documents(wikitext / "valid.txt", document_format="lines")
                  if len(p) > 200]
    inputs = []
    for i in range(3):
        inputs.append(root / f"wiki{i}.jsonl")
        inputs[-1].write_text(to_jsonl(paragraphs[i * 15:(i + 1) * 15]))
    data.build_indexed_dataset(inputs, root / "wiki", tok, output_shards=3, progress=False)
    topics = data.prepare_embedded_dataset(root / "topics", tok, progress=False)
    return {"wiki": str(root / "wiki"), "topics": topics, "root": str(root)}


def _build(blend: data.Blend, cache: Path, train_samples: int, valid_samples: int = 4 * MBS):
    return data.build_datasets(blend, load_tokenizer("byte"), seq_length=SEQ, seed=3,
                               num_train_samples=train_samples, num_valid_samples=valid_samples,
                               cache_dir=cache)


def test_blend_draws_by_weight_and_accounts_every_token(world1: None, corpora: dict[str, str],
                                                        tmp_path: Path) -> None:
    """A 70/30 blend of a 3-shard glob and a single prefix: Megatron's BlendedDataset draws
    each stage's samples in the weights' proportion (within a few samples: its blending
    indices keep every prefix of the sample sequence within one sample per dataset), every
    sample comes from the dataset the accounting attributes it to, the glob's shards share
    their weight by tokens, epochs = samples / samples per epoch of the train split, and a
    stage that runs past one epoch of a source is named in a warning. Guards against a blend
    that ignores weights and against accounting that does not match what is read."""
    config = DataConfig(blend=(BlendEntry(path=corpora["wiki"] + "-*", weight=0.7),
                               BlendEntry(path=corpora["topics"], weight=0.3)), split="90,10,0")
    blend = data.resolve_blend(config)
    assert [len(s.prefixes) for s in blend.sources[0]] == [3, 1]
    prefixes, weights = blend.megatron(0)
    wiki_tokens = blend.sources[0][0].tokens
    assert weights[:3] == pytest.approx([0.7 * t / sum(wiki_tokens) for t in wiki_tokens])
    stages = [240, 2400]
    train, valid = _build(blend, tmp_path / "cache", sum(stages))
    accounting = data.token_accounting(train, valid, blend, stage_samples=stages,
                                       seq_length=SEQ, valid_samples=4 * MBS)
    wiki_epoch = accounting["sources"][0]["samples_per_epoch"]
    assert accounting["sources"][0]["train_split_tokens"] == pytest.approx(
        0.9 * sum(wiki_tokens), rel=0.1)
    start = 0
    for stage, samples in zip(accounting["stages"], stages, strict=True):
        wiki, topics = stage["sources"]
        assert wiki["samples"] + topics["samples"] == samples
        assert abs(wiki["samples"] - 0.7 * samples) <= 4, stage
        assert wiki["tokens"] == wiki["samples"] * SEQ
        ids = [int(train[i]["dataset_id"]) for i in range(start, start + samples)]
        assert sum(prefixes[i] != corpora["topics"] for i in ids) == wiki["samples"]
        assert wiki["epochs"] == pytest.approx(wiki["samples"] / wiki_epoch)
        start += samples
    assert accounting["stages"][1]["sources"][0]["cumulative_epochs"] > 1
    assert accounting["stages"][0]["sources"][0]["cumulative_epochs"] < 1
    assert [w.split(":")[0] for w in accounting["warnings"]] == ["stage 2 would repeat data"]
    assert accounting["valid"]["samples"] == 4 * MBS
    assert any("stage 2 draws 2,400 samples = 76,800 tokens" in line
               for line in data.describe(accounting))


def test_separate_splits_use_whole_datasets(world1: None, corpora: dict[str, str],
                                            tmp_path: Path) -> None:
    """With {train, valid} blends each split reads only its own datasets, whole (no `split`):
    validation samples come from the valid dataset alone, and training never sees it.
    Guards against validation data leaking into training."""
    wiki = [f"{corpora['wiki']}-{i:05d}-of-00003" for i in range(3)]
    config = DataConfig(blend=SplitBlends(
        train=(BlendEntry(path=wiki[0], weight=2.0), BlendEntry(path=wiki[1], weight=1.0)),
        valid=(BlendEntry(path=wiki[2]),)))
    blend = data.resolve_blend(config)
    assert blend.split is None and not blend.built(2)
    train, valid = _build(blend, tmp_path / "cache", 90)
    valid_docs = set(map(tuple, _documents(wiki[2])))
    assert valid.dataset_path == wiki[2] and len(valid.indices) == len(valid_docs)
    assert {str(ds.dataset_path) for ds in train.datasets} == set(wiki[:2])
    accounting = data.token_accounting(train, valid, blend, stage_samples=[90],
                                       seq_length=SEQ, valid_samples=4 * MBS)
    assert [row["samples"] for row in accounting["stages"][0]["sources"]] == [60, 30]
    assert accounting["valid"]["sources"][0]["path"] == wiki[2]


def _documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _tiny_dataset(prefix: Path, documents: list[list[int]]) -> str:
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=DType.optimal_dtype(256))
    for ids in documents:
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_unusable_blends_fail_with_the_field_name(corpora: dict[str, str], wikitext: Path,
                                                  tmp_path: Path) -> None:
    """Errors name the config field and the dataset before Megatron asserts or loops: a missing
    prefix (with a hint when it was written in shards), a glob matching nothing, the same
    dataset twice, another tokenizer's dataset, an empty dataset, a split with fewer tokens
    than one sample, a split without weight. Guards against hangs in GPTDataset and training
    on the wrong vocabulary."""
    byte = load_tokenizer("byte")
    bpe = train_bpe([wikitext.joinpath("valid.txt").read_text()[:20000]], 300,
                    tmp_path / "bpe.json")
    data.build_indexed_dataset([Path(corpora["root"]) / "wiki0.jsonl"], tmp_path / "bpe", bpe,
                               progress=False)
    empty = _tiny_dataset(tmp_path / "empty", [])
    short = _tiny_dataset(tmp_path / "short", [[1] * 20] * 10)

    def blend(*paths: str, split: str = "90,10,0") -> data.Blend:
        return data.resolve_blend(DataConfig(
            blend=tuple(BlendEntry(path=p) for p in paths), split=split))

    with pytest.raises(data.DataError, match=r"data.blend\[1\].path '.*/missing': no complete "
                                             r"indexed dataset"):
        blend(corpora["topics"], str(tmp_path / "missing"))
    with pytest.raises(data.DataError, match=r"written in shards \(.*wiki-00000-of-00003, "
                                             r"\.\.\.\): use '.*wiki-\*'"):
        blend(corpora["wiki"])
    with pytest.raises(data.DataError, match=r"data.blend\[0\].path '.*nothing-\*': matches no"):
        blend(str(tmp_path / "nothing-*"))
    with pytest.raises(data.DataError, match=r"data.blend\[1\].path: dataset .* is already in "
                                             r"data.blend\[0\]"):
        blend(corpora["wiki"] + "-*", corpora["wiki"] + "-00001-of-00003")
    with pytest.raises(data.DataError, match=r"data.blend\[0\].path '.*empty': the dataset is "
                                             r"empty"):
        blend(empty)
    checks = [
        (blend(corpora["topics"], str(tmp_path / "bpe")),
         r"data.blend\[1\].path '.*bpe' was tokenized with Hugging Face"),
        (blend(short), r"its valid split holds 20 tokens, too few for one sample of "
                       r"model.seq_length \+ 1 = 33"),
        (blend(corpora["topics"], split="0,1,0"), "gives the train split no weight"),
    ]
    for resolved, message in checks:
        with pytest.raises(data.DataError, match=message):
            data.check_blend(resolved, byte, SEQ)
    data.check_blend(blend(short), byte, 19)


def test_step_loader_serves_the_synchronous_batches(corpora: dict[str, str],
                                                    tmp_path: Path) -> None:
    """Issue 18 (8a): the DataLoader path (2 worker processes, and 0) returns exactly
    step_microbatches' samples in the same order for both DP ranks of DP=2: consecutive steps,
    a restart at another step (resume), and steps past the end of the dataset (epoch wrap).
    Pinned memory follows CUDA availability. Guards against prefetching changing what a step
    trains on, or a resumed run reading other samples."""
    train, _ = data.build_datasets(corpora["topics"], load_tokenizer("byte"), seq_length=SEQ,
                                   seed=5, num_train_samples=64, num_valid_samples=0,
                                   cache_dir=tmp_path / "cache")
    wrap = len(train) // GBS - 1
    steps = [0, 1, 2, 7, 8, wrap, wrap + 1, wrap + 2, 3]
    for workers in (0, 2):
        for rank in range(2):
            loader = data.StepLoader(train, global_batch_size=GBS, micro_batch_size=MBS,
                                     dp_rank=rank, dp_size=2, num_workers=workers)
            assert loader.pin_memory == torch.cuda.is_available()
            for step in steps:
                expected = data.step_microbatches(train, consumed_samples=step * GBS,
                                                  global_batch_size=GBS, micro_batch_size=MBS,
                                                  dp_rank=rank, dp_size=2)
                got = loader.microbatches(step * GBS)
                assert len(got) == len(expected) == GBS // (2 * MBS)
                for mine, theirs in zip(got, expected, strict=True):
                    assert mine.keys() == theirs.keys()
                    for key in mine:
                        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
            loader.close()


def test_sharded_parquet_and_zst_corpus_blends_70_30_through_the_trainer(
        wikitext: Path, tmp_path: Path) -> None:
    """Issue 16's end-to-end path: 3 parquet shards + 1 .jsonl.zst preprocessed with 2 workers
    into one dataset per shard, blended 70/30 with a second corpus in data.blend, trained by
    the real trainer (2 stages, tiny model, CPU). The start-up log and summary.json carry the
    token accounting; each stage's shares match the weights within a few samples and the
    tokens add up to steps x global batch x seq_length. Guards against the pieces working
    alone but not together."""
    tool = load_tool("preprocess_data")
    articles = list(read_documents(wikitext / "train.txt", document_format="wikitext"))[:48]
    for i in range(3):
        pq.write_table(pa.table({"text": articles[i * 12:(i + 1) * 12]}),
                       tmp_path / f"fwe-{i}.parquet", row_group_size=4)
    (tmp_path / "fwe-3.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(to_jsonl(articles[36:]).encode()))
    paragraphs = [p for p in read_documents(wikitext / "valid.txt", document_format="lines")
                  if len(p) > 200][:40]
    (tmp_path / "other.jsonl").write_text(to_jsonl(paragraphs))
    assert tool.main(["--input", str(tmp_path / "fwe-*"), "--workers", "2", "--output-shards",
                      "input", "--output-prefix", str(tmp_path / "data" / "fwe")]) == 0
    assert tool.main(["--input", str(tmp_path / "other.jsonl"), "--output-prefix",
                      str(tmp_path / "data" / "other")]) == 0
    config = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    config["data"] = {"tokenizer": "byte", "split": "95,5,0", "num_workers": 1,
                      "blend": [{"path": str(tmp_path / "data" / "fwe-*"), "weight": 0.7},
                                {"path": str(tmp_path / "data" / "other"), "weight": 0.3}]}
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "run"
    output = run_ok(train_command(tmp_path / "blend.yaml", [
        f"out_dir={out_dir}", "stages[0].train_steps=16", "stages[1].train_steps=12",
        "train.eval_interval=6", "train.eval_iters=1", "logging.tensorboard=false",
        "logging.plots=false"]))
    accounting = json.loads((out_dir / "summary.json").read_text())["data"]
    assert [s["datasets"] for s in accounting["sources"]] == [4, 1]
    assert [s["weight"] for s in accounting["sources"]] == pytest.approx([0.7, 0.3])
    for stage, steps in zip(accounting["stages"], (12, 12), strict=True):
        fwe, other = stage["sources"]
        assert stage["samples"] == fwe["samples"] + other["samples"] == steps * 8
        assert abs(fwe["samples"] - 0.7 * stage["samples"]) <= 4, stage
        assert stage["tokens"] == steps * 8 * 64
        assert f"data: stage {stage['stage']} draws {steps * 8} samples" in output
