"""Run configs: YAML round trip, and every bad value rejected with its dotted field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_step.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    model_preset,
)

BASE = {
    "out_dir": "runs/x",
    "model": {"preset": "tiny", "num_layers": 6},
    "stages": [{"num_layers": 4, "train_steps": 20},
               {"num_layers": 6, "train_steps": 20, "lora": {"rank": 4}}],
}


def _with(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    return apply_overrides(data, [f"{k}={v}" for k, v in changes.items()])


def test_yaml_round_trip_is_lossless(tmp_path: Path) -> None:
    """dump_config -> load_config gives back an equal config (tuples, nested stages included)."""
    config = config_from_dict(_with(**{"stages[1].relora": "{reset_interval: 20}",
                                       "stages[1].growth.position": "[1, 3]"}))
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert config.stages[1].growth.position == (1, 3)
    assert config.stages[1].relora.reset_interval == 20


def test_preset_fields_can_be_overridden() -> None:
    """`model: {preset: tiny, num_layers: 6}` keeps the preset's other dimensions."""
    config = config_from_dict(BASE)
    assert config.model == model_preset("tiny", num_layers=6)
    assert config.model.hidden_size == 64


@pytest.mark.parametrize(("changes", "message"), [
    ({"stages[1].lora.rank": 0}, "stages[1].lora.rank: must be > 0, got 0"),
    ({"stages[0].foo": 1}, "stages[0].foo: unknown key"),
    ({"model.preset": "gpt5"}, "model.preset: unknown preset 'gpt5'"),
    ({"model.hidden_size": "big"}, "model.hidden_size: must be an integer, got 'big'"),
    ({"stages[1].lora.targets": "[linear_qkv, q_proj]"},
     "stages[1].lora.targets[1]: unknown target 'q_proj'"),
    ({"stages[1].growth.operator": "splice"}, "stages[1].growth.operator: must be one of"),
    ({"stages[1].num_layers": 3}, "stages[1].num_layers: must not shrink the model: 3 < previous"),
    ({"stages[1].grow_at_fraction": 1.5}, "stages[1].grow_at_fraction: must be in (0, 1]"),
    ({"parallel.tensor_model_parallel_size": 3},
     "parallel.tensor_model_parallel_size: 3 does not divide model.num_attention_heads (4)"),
    ({"parallel.pipeline_model_parallel_size": 8},
     "parallel.pipeline_model_parallel_size: 8 pipeline stages > stages[0].num_layers = 4"),
    ({"train.global_batch_size": 7}, "train.global_batch_size: 7 is not a multiple of"),
    ({"precision.fp8_frozen_block_size": 32},
     "precision.fp8_frozen_block_size: has no effect without precision.fp8_frozen_storage"),
    ({"precision.fp8_frozen_storage": True, "precision.fp8_frozen_block_size": -1},
     "precision.fp8_frozen_block_size: must be >= 0"),
    ({"precision.fp8_frozen_storage": True, "precision.fp8_frozen_block_size": 48},
     "precision.fp8_frozen_block_size: 48 does not divide the per-shard input dimension of "
     "linear_qkv (64), linear_proj (64), linear_fc1 (64), linear_fc2 (128) at TP 1"),
    ({"stages[1].relora": "{reset_interval: 4, rewarmup_steps: 4}"},
     "stages[1].relora.rewarmup_steps: 4 must be < reset_interval (4)"),
    ({"model.num_layers": 8}, "stages[1].num_layers: the last stage must reach model.num_layers"),
    ({"stages[1].growth.position": "top"},
     "stages[1].growth.position: must be one of 'upper', 'intermediate', 'lower', 'random' or "
     "must be a list, got 'top'"),
])
def test_bad_values_name_the_dotted_field(changes: dict, message: str) -> None:
    """Each user error is one ConfigError whose message starts with the offending field path."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(_with(**changes))
    assert str(info.value).startswith(message), str(info.value)


def test_set_overrides_go_through_the_same_validation(tmp_path: Path) -> None:
    """`--set` values are parsed as YAML scalars and validated like file values."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, ["train.seed=7", "optimizer.weight_decay=0.1",
                                "stages[0].lr=3e-4"])
    assert (config.train.seed, config.optimizer.weight_decay, config.stages[0].lr) == (
        7, 0.1, 3e-4)
    with pytest.raises(ConfigError, match=r"^train.seed: must be an integer"):
        load_config(path, ["train.seed=abc"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.seed"])
    with pytest.raises(ConfigError, match="index 5 out of range"):
        load_config(path, ["stages[5].lr=1"])


def test_stages_can_come_from_a_plan_file(tmp_path: Path) -> None:
    """`stages: plan.yaml` reads the stage list written by tools/plan_stages.py --write-plan,
    relative to the config file."""
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"stages": BASE["stages"]}))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "stages": "plan.yaml"}))
    assert load_config(path).stages == config_from_dict(BASE).stages
    path.write_text(yaml.safe_dump({**BASE, "stages": "missing.yaml"}))
    with pytest.raises(ConfigError, match=r"^stages: plan file .*missing.yaml' does not exist"):
        load_config(path)


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    """A missing config file or invalid YAML gives an error naming the file."""
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML"):
        load_config(bad)
