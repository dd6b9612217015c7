import functools

import pytest
import torch
from omegaconf import OmegaConf

from dpokit.config import ConfigError, check_keys, instantiate, load_config
from dpokit.errors import DpokitError

YAML = """
lr_scale: 2.0
steps: 10
name: run
optimizer:
  _component_: torch.optim.SGD
  lr: 0.1
loss:
  _component_: dpokit.losses.dpo_loss
  _partial_: true
  beta: 0.1
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    return p


def test_overrides_apply_with_yaml_types(path):
    cfg = load_config(path, ["steps=3", "optimizer.lr=1e-3", "name=other", "+extra.deep=[1, 2]", "~lr_scale"])
    assert cfg.steps == 3 and cfg.optimizer.lr == 1e-3 and cfg.name == "other"
    assert list(cfg.extra.deep) == [1, 2] and "lr_scale" not in cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "no key 'stepz' in the config (did you mean 'steps'?)"),
        ("optimizer.lrr=1", "no key 'optimizer.lrr'"),
        ("steps=abc", "expected int"),
        ("+steps=4", "already exists"),
        ("~nope", "no key 'nope' to remove"),
        ("steps", "expected key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(path, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)


def test_check_keys_rejects_unknown_and_missing(path):
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'lr_scale'"):
        check_keys(cfg, ["steps", "name", "optimizer", "loss", "lr_scal"])
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['epochs'\]"):
        check_keys(cfg, ["lr_scale", "steps", "name", "optimizer", "loss", "epochs"])


def test_instantiate_builds_components_and_partials(path):
    cfg = load_config(path)
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer, params)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    loss = instantiate(cfg.loss)
    assert isinstance(loss, functools.partial) and loss.keywords == {"beta": 0.1}


def test_instantiate_unknown_argument_names_key_and_suggests(path):
    cfg = load_config(path, ["+optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"optimizer.lrr: not a parameter of torch.optim.SGD \(did you mean 'lr'\?\)"):
        instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])


def test_instantiate_bad_component_path():
    cfg = OmegaConf.create({"m": {"_component_": "dpokit.models.tinyy"}})
    with pytest.raises(ConfigError, match=r"has no 'tinyy' \(did you mean 'tiny'\?\)"):
        instantiate(cfg.m)
    cfg = OmegaConf.create({"m": {"_component_": "nonexistent_pkg.thing"}})
    with pytest.raises(ConfigError, match="cannot import"):
        instantiate(cfg.m)


def test_instantiate_builder_value_error_becomes_config_error():
    cfg = OmegaConf.create({"model": {"_component_": "dpokit.models.lora_tiny", "lora_rank": 0}})
    with pytest.raises(ConfigError, match=r"model \(dpokit.models.lora_tiny\): LoRA rank must be positive"):
        instantiate(cfg.model)


def test_a_data_error_spells_its_fix_as_the_config_key_to_set(tmp_path):
    from dpokit.data import byte_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "", "rejected": "b"}\n'
    )
    cfg = OmegaConf.create(
        {
            "train_dataset": {
                "_component_": "dpokit.data.PreferenceDataset",
                "path": str(data),
                "max_seq_len": 64,
                "skip_invalid": False,
            }
        }
    )
    with pytest.raises(DpokitError) as raised:  # the data's error, not the config's: it names the file
        instantiate(cfg.train_dataset, tokenizer=byte_tokenizer())
    assert not isinstance(raised.value, ConfigError)
    assert str(raised.value) == (
        f"{data}:2: field 'chosen': empty response (train_dataset.skip_invalid=true skips such records and "
        "counts them by reason)"
    )
    cfg.train_dataset.skip_invalid = True
    assert len(instantiate(cfg.train_dataset, tokenizer=byte_tokenizer())) == 1
