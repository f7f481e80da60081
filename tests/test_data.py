"""Tokenizers, indexed datasets, Megatron GPTDatasets and the per-step batches built on them."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import nltk
import numpy as np
import pytest
import sentencepiece
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from nltk.tokenize.punkt import PunktTrainer, save_punkt_params
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from megatron_step import data
from megatron_step.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_step.data.corpus import embedded_documents, sentence_splitter, to_jsonl
from megatron_step.data.sources import CorpusError, read_documents, texts
from megatron_step.data.tokenizer import TokenizerError, load_tokenizer, train_bpe
from megatron_step.forward import train_step
from megatron_step.model import build_model
from megatron_step.optim import wrap_and_optimize

from builders import FP32
from dist import run_world

UNICODE = "Gr\u00fc\u00dfe, \u6226\u5834 \U0001f642!\n\tTabs, \"quotes\" and\r\nCRLF."
SEQ, GBS, MBS = 32, 8, 2


def _wikitext_lines(wikitext: Path, count: int) -> str:
    with (wikitext / "valid.txt").open(encoding="utf-8") as stream:
        return "".join(next(stream) for _ in range(count))


def _stored_documents(prefix: Path) -> list[np.ndarray]:
    """Token ids per document of an indexed dataset (its sequences concatenated)."""
    dataset = IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    return [np.concatenate([dataset[i] for i in range(a, b)])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture(scope="module")
def bpe_path(wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-id byte-level BPE trained on the first 600 lines of WikiText-2 valid."""
    text = _wikitext_lines(wikitext, 600)
    return Path(train_bpe([text], 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json").spec)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus as a byte-level indexed dataset (built once for this module)."""
    root = tmp_path_factory.mktemp("embedded")
    return Path(data.prepare_embedded_dataset(root / "data", load_tokenizer("byte"),
                                              progress=False))


def _datasets(prefix: Path, cache: Path, seed: int = 7, train_samples: int = 64):
    return data.build_datasets(prefix, load_tokenizer("byte"), seq_length=SEQ, split="98,2,0",
                               seed=seed, num_train_samples=train_samples,
                               num_valid_samples=4 * MBS, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_any_text() -> None:
    """Byte level: ids are the UTF-8 bytes (non-ASCII and control characters included), decode
    inverts encode exactly, EOD is 0 and fits the 256-id tiny preset; it needs no files and
    survives pickling (worker processes). Guards against lossy decoding and a vocab > 256."""
    tok = load_tokenizer("byte")
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert (tok.vocab_size, tok.eod, tok.pad, tok.files()) == (256, 0, -1, [])
    assert pickle.loads(pickle.dumps(tok)).encode(UNICODE) == ids
    assert "byte" in tok.describe()


def test_trained_bpe_is_deterministic_and_round_trips(bpe_path: Path, wikitext: Path,
                                                      tmp_path: Path) -> None:
    """train_bpe: the same texts give a byte-identical tokenizer.json; the loaded tokenizer
    (by file or by directory) round-trips WikiText and Unicode exactly, compresses (fewer ids than
    bytes) and uses <|endoftext|> as EOD. Guards against nondeterministic BPE merges (benchmarks
    compare runs) and special tokens leaking into encode."""
    again = train_bpe([_wikitext_lines(wikitext, 600)], 400, tmp_path / "tokenizer.json")
    assert Path(again.spec).read_bytes() == Path(bpe_path).read_bytes()
    text = _wikitext_lines(wikitext, 40)
    for tok in (load_tokenizer(str(bpe_path)), load_tokenizer(str(Path(bpe_path).parent))):
        assert tok.kind == "huggingface" and tok.vocab_size == 400
        assert tok.eod == 0 and tok.files() == [Path(bpe_path)]
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.decode(tok.encode(UNICODE)) == UNICODE
        assert tok.eod not in ids and len(ids) < 0.6 * len(text.encode())
    assert load_tokenizer(str(bpe_path)).unique_identifiers != \
        load_tokenizer("byte").unique_identifiers
    with pytest.raises(FileExistsError):
        train_bpe(["x"], 400, tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size: must be >= 257"):
        train_bpe(["x"], 256, tmp_path / "small.json")


def test_sentencepiece_model(wikitext: Path, tmp_path: Path) -> None:
    """A SentencePiece model trained here loads by path: vocab and EOD (its </s>) come from the
    model, encode adds no BOS/EOS, decode inverts encode on normalised text, and the model file
    is what an export must copy. Guards against EOD = -1 or BOS leaking into documents."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_wikitext_lines(wikitext, 800))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    text = "The game began development in 2010 , carrying over a large portion ."
    ids = tok.encode(text)
    assert (tok.kind, tok.vocab_size, tok.eod) == ("sentencepiece", 300, 2)
    assert tok.decode(ids) == text and 1 not in ids and 2 not in ids
    assert tok.files() == [tmp_path / "sp.model"]


def test_bad_tokenizer_specs_name_the_spec_and_the_problem(tmp_path: Path) -> None:
    """Every unusable spec raises TokenizerError naming the spec and what is wrong (missing,
    directory without tokenizer.json, empty, not a tokenizer, no end-of-document token).
    Guards against raw Rust/C++ exceptions and silently picking a wrong EOD."""
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("just some text\n")
    (tmp_path / "other.json").write_text('{"vocab": [1, 2]}')
    no_eod = RustTokenizer(models.BPE())
    no_eod.pre_tokenizer = pre_tokenizers.ByteLevel()
    no_eod.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=280))
    no_eod.save(str(tmp_path / "no_eod.json"))
    cases = {
        str(tmp_path / "missing.json"): "no such file",
        str(tmp_path): "directory has no tokenizer.json",
        str(tmp_path / "empty.model"): "file is empty",
        str(tmp_path / "notes.txt"): "not a tokenizer",
        str(tmp_path / "other.json"): "not a Hugging Face tokenizer.json",
        str(tmp_path / "no_eod.json"): "has no end-of-document token",
    }
    for spec, problem in cases.items():
        with pytest.raises(TokenizerError, match=problem) as info:
            load_tokenizer(spec)
        assert spec in str(info.value)


# ---------------------------------------------------------------------------------------------
# Documents and indexed datasets


def test_document_formats_slice_the_file_exactly(tmp_path: Path) -> None:
    """Plain text: blank-line blocks, single lines, or WikiText articles (a ` = Title = ` line
    starts one; ` = = Section = = ` does not), each an exact slice of the file; JSONL records
    by key. Guards against dropped lines, merged articles and off-by-one document boundaries."""
    text = (" \n = Alpha = \n \n First para .\n Second para .\n \n = = History = = \n \n"
            " Old .\n \n = Beta = \n \n Beta text .\n")
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    read = [*read_documents(path, document_format="wikitext")]
    assert read == [" = Alpha = \n \n First para .\n Second para .\n \n = = History = = \n \n"
                    " Old .\n \n", " = Beta = \n \n Beta text .\n"]
    blocks = [*read_documents(path)]
    assert blocks[1] == " First para .\n Second para .\n" and len(blocks) == 6
    assert len(list(read_documents(path, document_format="lines"))) == 7
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(to_jsonl(["a\nb", "", "c"]) + "\n")
    assert [*read_documents(jsonl)] == ["a\nb", "", "c"]


def test_indexed_dataset_holds_exactly_the_encoded_documents(wikitext: Path, bpe_path: Path,
                                                             tmp_path: Path) -> None:
    """Reading the .bin/.idx back gives, per document, tokenizer.encode(document) + [EOD], for
    text and JSONL inputs and for byte and BPE tokenizers; sentence splitting only adds sequence
    boundaries (same ids per document, more sequences); two workers write the same bytes as one.
    Guards against lost/duplicated documents, a wrong dtype and worker-order nondeterminism."""
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(_wikitext_lines(wikitext, 300))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(to_jsonl(["", "first record \u00e9", "second record\n"]))
    docs = [text for path in (wiki, jsonl)
            for text in read_documents(path, document_format="auto") if text.strip()]
    for spec in ("byte", str(bpe_path)):
        tok = load_tokenizer(spec)
        prefix = tmp_path / f"{tok.kind}"
        stats = data.build_indexed_dataset([wiki, jsonl], prefix, tok, progress=False)
        stored = _stored_documents(prefix)
        assert len(stored) == len(docs) == stats.documents == stats.sequences
        for ids, text in zip(stored, docs, strict=True):
            assert ids.tolist() == [*tok.encode(text), tok.eod]
        assert stats.skipped_documents == 1 and stats.tokens == sum(map(len, stored))
        assert IndexedDataset(str(prefix)).index.dtype == np.uint16
        assert data.read_dataset_meta(prefix)["tokenizer"] == dict(tok.unique_identifiers)
    tok = load_tokenizer("byte")
    split = data.build_indexed_dataset([wiki, jsonl], tmp_path / "split", tok, workers=2,
                                       split_sentences=True, progress=False)
    assert [ids.tolist() for ids in _stored_documents(tmp_path / "split")] == \
        [ids.tolist() for ids in _stored_documents(tmp_path / "byte")]
    assert split.sequences > 3 * split.documents and "trained on" in split.sentence_splitter
    data.build_indexed_dataset([wiki, jsonl], tmp_path / "two", tok, workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"two{suffix}").read_bytes() == \
            (tmp_path / f"byte{suffix}").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_installed_punkt_model_is_preferred(wikitext: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With nltk's punkt_tab/english installed the splitter uses it and never trains; without
    it, Punkt is trained on the corpus (never downloaded). Pieces always re-join to the text.
    Guards against network access and against ignoring an installed model."""
    text = _wikitext_lines(wikitext, 200)
    trained = sentence_splitter(iter([text]))
    assert "trained on the first" in trained.source
    trainer = PunktTrainer()
    trainer.train(text, finalize=True)
    root = tmp_path / "nltk_data"
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(root), *nltk.data.path])  # also nltk's sandbox
    save_punkt_params(trainer.get_params(), str(root / "tokenizers" / "punkt_tab" / "english"))
    installed = sentence_splitter(iter(()))
    assert installed.source == "nltk punkt_tab/english (installed)"
    for splitter in (trained, installed):
        pieces = splitter.split(text)
        assert "".join(pieces) == text and len(pieces) > 20


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def test_embedded_corpus_is_deterministic_and_cached(embedded: Path, bpe_path: Path) -> None:
    """The embedded corpus is the same text every time (sha256), substantial (> 300 KB, > 50
    documents), and its dataset is reused, not rebuilt, for the same tokenizer, while another
    tokenizer gets its own dataset. Guards against a run-to-run different demo corpus and
    re-tokenizing on every start."""
    digests = {hashlib.sha256(json.dumps(embedded_documents()).encode()).hexdigest()
               for _ in range(2)}
    documents = embedded_documents()
    assert len(digests) == 1
    assert sum(map(len, documents)) > 300_000 and len(documents) > 50
    idx = embedded.with_suffix(".idx")
    before = idx.stat().st_mtime_ns
    again = data.prepare_embedded_dataset(embedded.parent, load_tokenizer("byte"),
                                          progress=False)
    assert again == str(embedded) and idx.stat().st_mtime_ns == before
    assert [ids.tolist()[:-1] for ids in _stored_documents(embedded)] == \
        [list(text.encode()) for text in documents]
    other = data.prepare_embedded_dataset(embedded.parent, load_tokenizer(str(bpe_path)),
                                          progress=False)
    assert other != str(embedded) and IndexedDataset.exists(other)


# ---------------------------------------------------------------------------------------------
# GPTDataset and batches


def test_gpt_samples_are_next_token_windows_and_seeded(embedded: Path, tmp_path: Path) -> None:
    """GPTDataset samples: tokens/labels/position_ids/loss_mask of length seq_length, labels =
    tokens shifted by one, every token from the corpus; the order is a function of the seed only
    (a fresh cache gives the same samples, another seed a different order). Guards against
    misaligned labels and unseeded shuffling."""
    train, valid = _datasets(embedded, tmp_path / "cache_a")
    same, _ = _datasets(embedded, tmp_path / "cache_b")
    other, _ = _datasets(embedded, tmp_path / "cache_c", seed=8)
    assert len(train) >= 64 and len(valid) >= 4 * MBS
    for i in range(8):
        sample = train[i]
        assert sample.keys() == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(v.shape == (SEQ,) for v in sample.values())
        torch.testing.assert_close(sample["labels"][:-1], sample["tokens"][1:], rtol=0, atol=0)
        torch.testing.assert_close(sample["position_ids"], torch.arange(SEQ), rtol=0, atol=0)
        assert bool((sample["loss_mask"] == 1).all())
        torch.testing.assert_close(same[i]["tokens"], sample["tokens"], rtol=0, atol=0)
    first = torch.stack([train[i]["tokens"] for i in range(16)])
    assert not torch.equal(first, torch.stack([other[i]["tokens"] for i in range(16)]))


def test_step_batches_resume_and_wrap(embedded: Path, tmp_path: Path) -> None:
    """step_microbatches is a pure function of consumed_samples: a rebuilt dataset (as after a
    restart) yields the same batches for step k; consecutive steps do not repeat samples within
    an epoch; consumed_samples past the end wraps to the start; validation batches are the same
    at every call. Batches have forward.py's dtypes and shapes. Guards against resume feeding
    different data and against DataLoader-style hidden iterator state."""
    def step(dataset, k: int) -> list[dict[str, torch.Tensor]]:
        return data.step_microbatches(dataset, consumed_samples=k * GBS, global_batch_size=GBS,
                                      micro_batch_size=MBS, dp_rank=0, dp_size=1)

    train, valid = _datasets(embedded, tmp_path / "cache")
    run = [step(train, k) for k in range(3)]
    restarted, _ = _datasets(embedded, tmp_path / "cache")
    batch = run[2][0]
    assert len(run[2]) == GBS // MBS
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "tokens": (torch.int64, (MBS, SEQ)), "labels": (torch.int64, (MBS, SEQ)),
        "loss_mask": (torch.float32, (MBS, SEQ)), "position_ids": (torch.int64, (MBS, SEQ))}
    for mine, theirs in zip(run[2], step(restarted, 2), strict=True):
        for key in batch:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
    rows = {tuple(r.tolist()) for batches in run for b in batches for r in b["tokens"]}
    assert len(rows) == 3 * GBS
    wrapped = data.step_microbatches(train, consumed_samples=len(train), global_batch_size=GBS,
                                     micro_batch_size=MBS, dp_rank=0, dp_size=1)
    torch.testing.assert_close(wrapped[0]["tokens"], run[0][0]["tokens"], rtol=0, atol=0)
    evals = [data.valid_microbatches(valid, 4 * MBS, MBS, 0, 1) for _ in range(2)]
    torch.testing.assert_close(evals[0][3]["tokens"], evals[1][3]["tokens"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"global_batch_size \(8\) is not a multiple"):
        data.sample_indices(0, 8, 2, 0, 3)


def _dp_rank_batches(directory: Path, steps: int) -> tuple[str, list, list, str]:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:  # a file where the data directory should be: rank 0 fails, rank 1 must not hang
        data.prepare_embedded_dataset(directory / "blocker" / "data", load_tokenizer("byte"),
                                      progress=False)
        failure = "no error"
    except (OSError, data.DataError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    prefix = data.prepare_embedded_dataset(directory / "data", load_tokenizer("byte"),
                                           progress=False)
    train, valid = _datasets(Path(prefix), directory / "cache")
    batches = [data.step_microbatches(train, consumed_samples=k * GBS, global_batch_size=GBS,
                                      micro_batch_size=MBS, dp_rank=rank, dp_size=world)
               for k in range(steps)]
    return prefix, batches, data.valid_microbatches(valid, 4 * MBS, MBS, rank, world), failure


def test_dp_ranks_together_see_the_single_rank_batches(embedded: Path, tmp_path: Path) -> None:
    """Two gloo ranks build the embedded dataset and Megatron's index caches collectively (rank
    0 first, barrier, then rank 1 loads) and each takes its DP share: interleaved in Megatron's
    sampler order, the ranks' micro-batches are exactly one process's micro-batches, for train
    steps and validation. A failure on rank 0 while building reaches rank 1 as an error.
    Guards against DP ranks overlapping or skipping samples, and against the collective dataset
    build deadlocking or diverging on CPU."""
    steps = 2
    (tmp_path / "blocker").write_text("not a directory")
    ranks = run_world(_dp_rank_batches, 2, tmp_path, steps)
    assert ranks[0][3].startswith("NotADirectoryError")
    assert ranks[1][3].startswith("DataError: rank 0 could not build the embedded dataset")
    train, valid = _datasets(embedded, tmp_path / "single_cache")
    assert ranks[0][0] == ranks[1][0]
    for k in range(steps):
        single = data.step_microbatches(train, consumed_samples=k * GBS, global_batch_size=GBS,
                                        micro_batch_size=MBS, dp_rank=0, dp_size=1)
        # micro-batch m of rank r holds samples (m * dp + r) * mbs ...: interleave the ranks
        shared = [ranks[m % 2][1][k][m // 2] for m in range(len(single))]
        for mine, theirs in zip(single, shared, strict=True):
            for key in mine:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
    single_valid = data.valid_microbatches(valid, 4 * MBS, MBS, 0, 1)
    shared_valid = [ranks[m % 2][2][m // 2] for m in range(4)]
    for mine, theirs in zip(single_valid, shared_valid, strict=True):
        torch.testing.assert_close(mine["tokens"], theirs["tokens"], rtol=0, atol=0)


def test_build_datasets_rejects_unusable_data(embedded: Path, bpe_path: Path,
                                              tmp_path: Path) -> None:
    """build_datasets errors name the problem before Megatron asserts or loops forever: no
    dataset at the prefix, a dataset tokenized by another tokenizer, a valid split without any
    sequence. Guards against training on ids from the wrong vocabulary and a silent hang."""
    tok = load_tokenizer("byte")
    kwargs = {"seq_length": SEQ, "seed": 1, "num_train_samples": 8, "num_valid_samples": 2,
              "cache_dir": tmp_path / "cache"}
    with pytest.raises(data.DataError, match="no complete indexed dataset"):
        data.build_datasets(tmp_path / "missing", tok, **kwargs)
    with pytest.raises(data.DataError, match="but data.tokenizer is Hugging Face"):
        data.build_datasets(embedded, load_tokenizer(str(bpe_path)), **kwargs)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(to_jsonl(["one document", "two documents", "three"]))
    data.build_indexed_dataset([tiny], tmp_path / "tiny", tok, progress=False)
    with pytest.raises(data.DataError, match="valid split .* gets none of its 3 sequences"):
        data.build_datasets(tmp_path / "tiny", tok, **kwargs)
    train, valid = data.build_datasets(tmp_path / "tiny", tok, **{**kwargs,
                                                                   "num_valid_samples": 0})
    assert valid is None and len(train) >= 8


def test_corpus_errors_name_file_and_line(tmp_path: Path) -> None:
    """Unreadable, non-UTF-8, empty and malformed inputs raise CorpusError naming the file (and
    line); nothing is written for them. Guards against tracebacks deep in json/codecs and
    half-written datasets."""
    bad = {"empty.txt": (b" \n\n", "empty.txt: no documents"),
           "latin.txt": (b"ok\n\xe9t\xe9\n", "latin.txt:2: not UTF-8"),
           "bad.jsonl": (b'{"text": "a"}\n\n{"text": oops}\n', "bad.jsonl:3: not valid JSON"),
           "key.jsonl": (b'{"body": "a"}\n', "key.jsonl:1: no 'text' key"),
           "list.jsonl": (b'["a"]\n', "list.jsonl:1: expected a JSON object")}
    tok = load_tokenizer("byte")
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CorpusError, match=message):
            data.build_indexed_dataset([tmp_path / name], tmp_path / "out", tok, progress=False)
    with pytest.raises(CorpusError, match="cannot read"):
        list(texts([tmp_path]))
    with pytest.raises(CorpusError, match="missing.txt: no such file"):
        data.build_indexed_dataset([tmp_path / "missing.txt"], tmp_path / "out", tok)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*tmp*"))


def test_batches_train_the_tiny_model(world1: None, tiny: ModelConfig, embedded: Path,
                                      tmp_path: Path) -> None:
    """The batches are what forward.train_step consumes: the tiny LLaMA (vocab 256 = the byte
    tokenizer's) starts near ln(256) on the embedded corpus and its loss falls within a few
    steps. Guards against a batch-format or vocabulary mismatch between data and model."""
    gpt = build_model(tiny, tiny.num_layers, ParallelConfig(), FP32, pre_process=True,
                      post_process=True)
    chunks, optimizer = wrap_and_optimize([gpt], ParallelConfig(), FP32, OptimizerConfig(),
                                          lr=3e-3)
    train, _ = _datasets(embedded, tmp_path / "cache", train_samples=20 * GBS)
    losses = [train_step(chunks, optimizer, data.step_microbatches(
        train, consumed_samples=k * GBS, global_batch_size=GBS, micro_batch_size=MBS,
        dp_rank=0, dp_size=1))["loss"] for k in range(20)]
    assert abs(losses[0] - np.log(256)) < 0.3, losses
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
