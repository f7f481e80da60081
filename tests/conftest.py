"""Shared fixtures: the tiny model, a one-process Megatron world, data paths, device markers.

Tests marked `gpu` need CUDA, tests marked `te` need Transformer Engine and tests marked `lm_eval`
need lm-evaluation-harness; where those are missing they are reported as skipped with the reason
(not run), never as passed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_step.config import ModelConfig, ParallelConfig, model_preset
from megatron_step.log import quiet_megatron_warnings

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = Path(os.environ.get("MEGATRON_STEP_WIKITEXT",
                               REPO.parent / "shared" / "data" / "wikitext-2"))

quiet_megatron_warnings()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from megatron_step import te

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="not run: needs a CUDA GPU"))
        if "te" in item.keywords and not te.HAVE_TE:
            reason = f"not run: needs Transformer Engine ({te.TE_UNAVAILABLE_REASON})"
            item.add_marker(pytest.mark.skip(reason=reason))  # no transformer_engine here
        if "lm_eval" in item.keywords and importlib.util.find_spec("lm_eval") is None:
            item.add_marker(pytest.mark.skip(reason="not run: needs lm-eval (pip install -e "
                                                    "'.[eval]')"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run in which nothing passed (all skipped or deselected) is a failure, not a success."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


@pytest.fixture
def tiny() -> ModelConfig:
    """The test-suite model: 4 layers, hidden 64, 4 heads, 2 query groups, vocab 256."""
    return model_preset("tiny")


@pytest.fixture
def world1(tiny: ModelConfig) -> Iterator[None]:
    """A one-process torch.distributed + Megatron world (TP=PP=DP=1) inside the pytest process."""
    import torch.distributed as dist

    from megatron_step.parallel import destroy_distributed, init_distributed

    init_distributed(tiny, tiny.num_layers, ParallelConfig(), rank=0, world_size=1,
                     store=dist.HashStore())
    yield
    destroy_distributed()


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """WikiText-2 from ../shared; fails loudly (never skips) when it is missing."""
    if not (WIKITEXT / "train.txt").is_file():
        pytest.fail(f"WikiText-2 not found at {WIKITEXT}: the suite reads it from ../shared "
                    "(set MEGATRON_STEP_WIKITEXT to its directory)")
    return WIKITEXT
