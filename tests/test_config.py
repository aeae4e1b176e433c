"""palm.config: defaults pinned to configs/default.yaml, precedence, type checks, the weight-decay
rule, and what the prepared data fills in (`Config.resolved`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from palm import config as cfg
from palm.config import Config, ConfigError, ModelConfig, load_config, load_model_config
from palm.errors import PalmError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_is_exactly_the_built_in_defaults():
    """`python3 train.py` and `--config configs/default.yaml` are the same run, key for key."""
    written = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert written == Config().to_dict()  # every key listed, every value the default
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(ROOT / "configs" / name)


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: palm-s\n  n_layers: 2\ntrain:\n  max_steps: 50\n")
    config = load_config(path, ["train.max_steps=7", "model.dropout=0.1"])
    assert config.train.max_steps == 7  # the command line wins over the file
    assert config.model.n_layers == 2  # the file wins over the preset
    assert config.model.d_model == ModelConfig.preset("palm-s").d_model  # the preset is the base
    assert config.model.dropout == 0.1
    assert config.optim == cfg.OptimConfig()  # untouched sections keep the defaults


def test_values_are_checked_against_the_field_types():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # an int is a fine float
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)
    with pytest.raises(ConfigError, match="train.max_steps must be a int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.compile must be a bool"):
        load_config(None, ["train.compile=1"])
    with pytest.raises(ConfigError, match=r"unknown train key\(s\).*valid train keys: .*max_steps"):
        load_config(None, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["max_steps=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.parallel=zero"])


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold sections"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_config_errors_are_value_errors_with_exit_code_2():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, PalmError)
    assert ConfigError.exit_code == 2 and PalmError.exit_code == 1


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("lr^2", (1.0, 2.0)), (" lr ^ 1.5 ", (1.0, 1.5)), ("0.1", (0.1, 0.0)), (0.0, (0.0, 0.0))],
)
def test_weight_decay_is_a_number_or_a_power_of_lr(value, parsed):
    assert cfg.parse_weight_decay(value) == parsed


@pytest.mark.parametrize("value", ["lr2", "lr^", "1.5", -0.1, "lots"])
def test_bad_weight_decay_is_refused(value):
    with pytest.raises(ConfigError, match="weight_decay"):
        cfg.parse_weight_decay(value)
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        load_config(None, [f"optim.weight_decay={value}"])


def test_adamw_refuses_adafactors_decay_when_the_config_is_read():
    with pytest.raises(ConfigError, match="give AdamW a number"):
        load_config(None, ["optim.name=adamw"])  # the default decay is PaLM's lr^2
    config = load_config(None, ["optim.name=adamw", "optim.weight_decay=0.1"])
    assert config.optim.weight_decay == "0.1"  # kept as written, so saved configs show it


def test_resolved_takes_the_datas_vocabulary_and_defaults():
    config = load_config(None, ["model.preset=palm-tiny", "model.max_seq_len=64"])
    resolved = config.resolved(vocab_size=500, seq_len=128, batch_size=32, world_size=2)
    assert resolved.model.vocab_size == 500  # always the data's
    assert resolved.model.max_seq_len == 128  # grown to fit the training sequences
    assert (resolved.data.seq_len, resolved.data.batch_size) == (128, 32)
    assert resolved.data.micro_batch_size == 16  # the whole per-rank batch: 16 x 128 <= 8192
    explicit = load_config(None, ["data.seq_len=16", "data.batch_size=8"])
    kept = explicit.resolved(vocab_size=500, seq_len=128, batch_size=32, world_size=1)
    assert (kept.data.seq_len, kept.data.batch_size) == (16, 8)
    fine_tune = load_config(None, ["train.init_from=runs/x", "model.vocab_size=1000"])
    assert fine_tune.resolved(500, 128, 32, 1).model.vocab_size == 1000  # the checkpoint's
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        config.resolved(500, 128, 32, world_size=3)


@pytest.mark.parametrize(
    ("per_rank", "seq_len", "micro"), [(256, 256, 32), (12, 2048, 4), (7, 4096, 1), (6, 16, 6)]
)
def test_auto_micro_batch_is_the_largest_divisor_that_fits(per_rank, seq_len, micro):
    assert cfg.auto_micro_batch(per_rank, seq_len) == micro
    assert per_rank % micro == 0 and (micro == 1 or micro * seq_len <= cfg.TOKENS_PER_MICRO_BATCH)


def test_one_copy_of_every_choice_list():
    from palm import flops, schedules

    assert schedules.LR_SCHEDULES is cfg.SCHEDULES
    assert "PARALLEL" in vars(flops) and flops.PARALLEL is cfg.PARALLEL


def test_model_config_of_a_file(tmp_path):
    full = tmp_path / "full.yaml"
    full.write_text("model:\n  preset: palm-s\n  n_layers: 3\ntrain:\n  max_steps: 5\n")
    assert load_model_config(full) == dataclasses.replace(ModelConfig.preset("palm-s"), n_layers=3)
    bare = tmp_path / "bare.yaml"
    bare.write_text("d_model: 64\nn_heads: 2\nhead_dim: 32\n")
    assert load_model_config(bare).d_model == 64
    bare.write_text("d_modle: 64\n")
    with pytest.raises(ConfigError, match="unknown model key"):
        load_model_config(bare)
