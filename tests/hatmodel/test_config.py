"""The run configuration: one schema validates every key (type, range, choices, paths) before
anything is built or written, errors name the key and the value; ``DEFAULTS`` is the default
run; the paper configs state their whole recipe; ``--config`` never silently swaps a missing
file for a packaged config."""

from __future__ import annotations

import pytest
import yaml

from hatmodel import train as train_cli
from hatmodel.config import (
    CONFIG_DIR,
    DEFAULTS,
    FREE_FORM,
    SCHEMA,
    config_path,
    load_config,
    validate_config,
)

PAPER_CONFIGS = ("hat_coco", "hat_f30k", "teran_coco", "teran_f30k")


def _leaves(cfg: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in FREE_FORM:
            keys |= _leaves(value, name + ".")
        else:
            keys.add(name)
    return keys


def test_every_key_has_exactly_one_rule():
    assert _leaves(DEFAULTS) == set(SCHEMA)


def test_defaults_are_the_default_run():
    assert load_config() == load_config("hat_scenes") == validate_config(DEFAULTS)
    assert DEFAULTS["model"]["name"] == "hat" and DEFAULTS["data"]["kind"] == "scenes"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_state_their_whole_recipe(name):
    """Every key of the training recipe (those a resumed run may not change) in the loss,
    train, eval, model.align and model.text sections is written in the file itself."""
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    stated = _leaves(raw)
    for section in ("loss.", "train.", "eval.", "model.align.", "model.text."):
        recipe = {k for k, rule in SCHEMA.items() if k.startswith(section) and not rule.runtime}
        assert recipe - stated == set(), section


@pytest.mark.parametrize("override,error,message", [
    ("train.epochs=abc", TypeError, "train.epochs: expected an integer >= 1, got 'abc'"),
    ("train.epochs=0", ValueError, "train.epochs: expected an integer >= 1, got 0"),
    ("train.epochs=1.7", TypeError, "train.epochs: expected an integer >= 1, got 1.7"),
    ("train.epochs=true", TypeError, "train.epochs: expected an integer >= 1, got True"),
    ("train.batch_size=0", ValueError, "train.batch_size: expected an integer >= 2, got 0"),
    ("train.lr=-1", ValueError, "train.lr: expected a number >= 0, got -1"),
    ("train.lr=fast", TypeError, "train.lr: expected a number >= 0, got 'fast'"),
    ("model.align.pooling=mean", ValueError, "model.align.pooling: expected one of 'max', "
                                             "'scan', got 'mean'"),
    ("loss.name=triplet", ValueError, "loss.name: expected one of"),
    ("eval.protocol=2k", ValueError, "eval.protocol: expected one of '1k', '5k', got '2k'"),
    ("model.teran.dropout=1.5", ValueError, "model.teran.dropout: expected a number >= 0 and "
                                            "<= 1, got 1.5"),
    ("model.image.stages=[]", TypeError, "model.image.stages: expected a non-empty list"),
    ("model.text.layers=[1, -2, 3]", ValueError, "model.text.layers: expected a non-empty list "
                                                 "of integers with entries >= 0, got [1, -2, 3]"),
    ("model.image.kwargs=3", TypeError, "model.image.kwargs: expected a mapping, got 3"),
    ("train.amp=null", TypeError, "train.amp: expected true or false, got None"),
    ("train.device=gpu0", ValueError, "train.device: expected 'auto' or a torch device"),
    ("data.scenes.min_objects=5", ValueError, "data.scenes.min_objects / max_objects"),
    ("model.text.layers=[1, 2]", ValueError, "model.image.stages / model.text.layers"),
    ("model.align.weights=[1.0]", ValueError, "model.align.weights: expected one weight per "
                                              "level (3)"),
    ("train.nonsense=1", ValueError, "train.nonsense: unknown config key"),
    ("model.align=3", TypeError, "model.align: expected a mapping, got 3"),
])
def test_bad_values_name_the_key_and_the_value(override, error, message):
    with pytest.raises(error) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message)


def test_numbers_and_free_form_mappings():
    cfg = load_config(None, ["train.lr=1e-5", "train.time_limit_s=30",
                             "model.image.kwargs.window_size=2"])
    assert cfg["train"]["lr"] == 1e-5 and isinstance(cfg["train"]["time_limit_s"], float)
    # One entry of a free-form mapping changes; the others stay.
    assert cfg["model"]["image"]["kwargs"] == {**DEFAULTS["model"]["image"]["kwargs"],
                                               "window_size": 2}
    # A whole mapping replaces the previous one (BertConfig's defaults: BERT-base).
    assert load_config(None, ["model.text.config={}"])["model"]["text"]["config"] == {}
    assert load_config("hat_coco")["model"]["image"]["kwargs"] == {}


def test_paths_are_checked_for_a_run(tmp_path):
    cfg = load_config("hat_coco")
    validate_config(cfg)  # building the model alone needs none of its files
    with pytest.raises(ValueError, match="model.image.checkpoint: no file at "
                                         "'pretrained/swin_base"):
        validate_config(cfg, check_paths=True)
    data = load_config(None, ["data.kind=coco", f"data.root={tmp_path}"])
    with pytest.raises(ValueError, match="data.json and data.root: required"):
        validate_config(data, check_paths=True)


def test_config_paths_never_fall_back_to_a_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path("hat_tiny") == CONFIG_DIR / "hat_tiny.yaml"
    for missing in ("configs/hat_tiny.yaml", "hat_tiny.yaml", "elsewhere/hat_tiny"):
        with pytest.raises(ValueError, match=f"config: no YAML file at '{missing}' "
                                             r"\(the packaged config is --config hat_tiny\)"):
            config_path(missing)
    with pytest.raises(ValueError, match="config: 'hat_tinny' is not a packaged config"):
        config_path("hat_tinny")
    (tmp_path / "hat_tiny.yaml").write_text("train: {epochs: 7}\n")
    assert load_config("hat_tiny.yaml")["train"]["epochs"] == 7  # the file, not the package
    (tmp_path / "broken.yaml").write_text("train: [\n")
    with pytest.raises(ValueError, match="config: broken.yaml is not valid YAML"):
        load_config("broken.yaml")


@pytest.mark.parametrize("args", [
    ["train.epochs=abc"], ["train.batch_size=0"], ["--config", "missing.yaml"],
    ["data.kind=coco", "data.json=/no/such/file.json"],
])
def test_train_cli_fails_before_writing_anything(tmp_path, args):
    out = tmp_path / "run"
    with pytest.raises((TypeError, ValueError)):
        train_cli.main(["--output-dir", str(out), "--no-progress", *args])
    assert not out.exists()
