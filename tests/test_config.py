import pytest
import yaml

from sllm.cli import main
from sllm.config import Config, config_from_dict, load_config, parse_override, save_config
from sllm.errors import UserError


def test_overrides_are_typed_by_the_dataclass():
    cfg = load_config(
        "demo",
        ["train.lr=3e-4", "model.n_layer=2", "sample.prompts=[가, 나]", "tokenizer.path=tok"],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 2
    assert cfg.sample.prompts == ["가", "나"]
    assert cfg.tokenizer.path == "tok"
    assert cfg.data.txt_mode == "paragraph"  # from the preset


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config("demo", ["train.max_steps=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"n_layers": 2}}, "unknown config key model.n_layers"),
        ({"modle": {}}, "unknown config section 'modle'"),
        ({"train": {"max_steps": "many"}}, "train.max_steps must be of type int"),
        ({"train": {"max_steps": True}}, "train.max_steps must be of type int"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "divisible"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "min_lr"),
        ({"train": {"warmup_steps": -1}}, "train.warmup_steps must not be negative, got -1"),
        ({"train": {"grad_clip": -0.5}}, "train.grad_clip must not be negative"),
        ({"train": {"log_interval": 0}}, "train.log_interval must be positive"),
        ({"train": {"beta2": 1.0}}, r"train.beta2 must be in \[0, 1\)"),
        ({"data": {"val_ratio": 0.6, "test_ratio": 0.5}}, "sum below 1"),
        ({"sample": {"top_p": 0}}, "top_p"),
        ({"eval": {"stride": 1000}}, "eval.stride"),
        ({"model": {"arch": "rnn"}}, "allowed values: gpt, ffn"),
        ({"train": {"lr": "nan"}}, "train.lr must be a finite number"),
        ({"train": {"grad_clip": "inf"}}, "train.grad_clip must be a finite number"),
        ({"train": {"epochs": "nan"}}, "train.epochs must be a finite number"),
        (
            {"train": {"seed": "99999999999999999999999"}},
            "train.seed is '99999999999999999999999', too large",
        ),
        ({"train": {"seed": -1}}, "train.seed must not be negative"),
        ({"sample": {"temperature": "nan"}}, "sample.temperature must be a finite number"),
    ],
)
def test_invalid_configs_name_the_key(raw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config_from_dict(raw)


def test_override_syntax_errors():
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("lr=3")
    assert parse_override("train.lr=1e-3") == ("train", "lr", "1e-3")
    assert isinstance(Config().train.lr, float)


def test_every_config_field_is_declared_with_a_one_line_help():
    """...and each integer or float of a section with the range it must lie in."""
    import typing
    from dataclasses import fields

    from sllm.config import SECTIONS, SourceConfig

    for section in [*SECTIONS.values(), SourceConfig]:
        hints = typing.get_type_hints(section)
        for spec in fields(section):
            help = spec.metadata["help"]
            assert help and "\n" not in help and len(help) <= 100, (section.__name__, spec.name)
            if hints[spec.name] in (int, float) and section is not SourceConfig:
                assert spec.metadata["range"] is not None, (section.__name__, spec.name)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"n_kv_head": -1}}, "config key model.n_kv_head must not be negative, got -1"),
        ({"data": {"min_script_ratio": 0}}, r"config key data.min_script_ratio must be in \(0, 1\], got 0"),
        (
            {"sample": {"presence_penalty": 3}},
            r"config key sample.presence_penalty must be in \[-2, 2\], got 3",
        ),
        ({"train": {"micro_batch": 0}}, "config key train.micro_batch must be positive, got 0"),
    ],
)
def test_a_value_outside_its_declared_range_names_the_key_and_the_range(raw, message):
    with pytest.raises(UserError, match=message):
        config_from_dict(raw)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_config_inherits_a_chain_of_bases_merging_sections_and_replacing_lists(tmp_path, capsys):
    _write(
        tmp_path / "presets/parent.yaml",
        "base: demo\nmodel: {n_head: 2, n_embd: 64}\nsample: {prompts: [a, b]}\n",
    )
    _write(tmp_path / "presets/child.yaml", "base: parent.yaml\nmodel: {n_layer: 4}\ntrain: {lr: 1.0e-3}\n")
    grand = _write(tmp_path / "grand.yaml", "base: presets/child.yaml\nsample: {prompts: [c]}\n")
    cfg = load_config(str(grand), ["train.max_steps=9"])
    demo = load_config("demo")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (4, 2, 64)
    assert cfg.model.block_size == demo.model.block_size and cfg.data.dir == demo.data.dir
    assert cfg.sample.prompts == ["c"] and cfg.sample.top_k == demo.sample.top_k
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps) == (1e-3, 9, demo.train.warmup_steps)
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert "base" not in saved and config_from_dict(saved) == cfg

    main(["info", "--config", str(grand), "--show-config", "model.n_layer=5"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in shown and shown["model"]["n_layer"] == 5 and shown["sample"]["prompts"] == ["c"]
    assert shown["data"] == saved["data"]


def test_inheritance_cycles_and_missing_bases_are_one_line_naming_the_files(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(UserError) as cycle:
        load_config(str(tmp_path / "a.yaml"))
    assert str(cycle.value) == (
        "config files inherit in a cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml; "
        "remove one of these base: keys"
    )
    _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(UserError, match="cycle: self.yaml -> self.yaml;"):
        load_config(str(tmp_path / "self.yaml"))
    child = _write(tmp_path / "child.yaml", "base: prent.yaml\n")
    with pytest.raises(UserError) as missing:
        load_config(str(child))
    assert str(missing.value).startswith(
        f"config file {child}: base 'prent.yaml' not found as {tmp_path / 'prent.yaml'} "
        "or as a preset (demo, "
    )
    assert str(missing.value).endswith("give a YAML path relative to child.yaml or a preset name")


def test_unknown_keys_are_refused_after_merging_the_base(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: demo\nmodel: {n_layers: 2}\n")
    with pytest.raises(UserError, match="unknown config key model.n_layers; valid keys of model: arch,"):
        load_config(str(child))
    wrong_type = _write(tmp_path / "wrong.yaml", "base: demo\nmodel: 3\n")
    with pytest.raises(UserError, match="config section model must be a mapping"):
        load_config(str(wrong_type))
