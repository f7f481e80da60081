"""Weights & Biases logging next to TensorBoard: the only module that imports `wandb`.

`wandb` is optional (`pip install -e '.[wandb]'`) and imported only when `logging.wandb` is set;
without it the run stops at start-up with a message naming the field and the way out. Rank 0
logs, through `metrics.MetricsLog`: every numeric metric of a step (what TensorBoard gets), the
stage boundaries and the planner's predicted memory per stage, against `global_step` (a logged
metric, not wandb's own step counter, so a resumed run may re-log steps it rolled back to).
The run config goes into the W&B config. The run id is kept in `<out_dir>/wandb_run_id`, so a
resumed or requeued job continues the same W&B run. `mode: offline` writes everything under
`<out_dir>/wandb/` without network access; `wandb sync <out_dir>/wandb/offline-run-*` uploads it
later (clusters whose compute nodes have no internet).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import ModuleType
from typing import Any

from megatron_step.config import ConfigError, WandbConfig

RUN_ID_FILE = "wandb_run_id"
STEP_METRIC = "global_step"


def require_wandb() -> ModuleType:
    """The `wandb` module, or a ConfigError that says how to get it.

    Raises:
        ConfigError: `wandb` is not installed.
    """
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(f"logging.wandb: needs the `wandb` package, which cannot be imported "
                          f"({exc}); pip install wandb (or pip install -e '.[wandb]'), or remove "
                          "logging.wandb to log to TensorBoard and metrics.jsonl only") from None
    return wandb


class WandbRun:
    """One W&B run of a training run (rank 0)."""

    def __init__(self, config: WandbConfig, out_dir: Path, run_config: dict[str, Any]) -> None:
        wandb = require_wandb()
        id_file = out_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=config.project, entity=config.entity,
                              name=config.name or out_dir.resolve().name, mode=config.mode,
                              dir=str(out_dir), id=run_id, resume="allow", config=run_config)
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Numbers at `global_step` = step."""
        self.run.log({**values, STEP_METRIC: step})

    def finish(self) -> None:
        self.run.finish()
