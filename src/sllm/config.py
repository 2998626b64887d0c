"""Experiment configuration: dataclasses, YAML files, dotted overrides and validation.

The dataclasses are the one source of truth: every field is one `option` (default, one-line
help, range), from which the CLI builds its flags and against which YAML files and
`section.key=value` overrides are checked. A YAML file may start with `base: other.yaml` and
give only what differs; the `sample` section is built from `SamplingParams`. Everything is
validated before any work starts, so a typo never costs a training run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from argparse import Namespace
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sllm.atomic import write_text_atomic
from sllm.errors import UserError
from sllm.files import read_yaml
from sllm.options import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, check_range, option
from sllm.sampling import RUN_OPTIONS, SamplingParams

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class SourceConfig:
    name: str = option("", "name of the source in meta.json and the summary; default source<N>")
    inputs: list[str] = option([], "files, directories, globs or hf:NAME datasets of this source")
    text_field: str = option("", "field or column holding the text; empty means data.text_field")
    weight: float = option(0.0, "share of training windows drawn from this source; 0 for all: natural mix")
    split: Literal["auto", "train", "val", "test"] = option(
        "auto", "auto: split by data.val_ratio/test_ratio; else every document goes to this split"
    )


@dataclass
class DataConfig:
    dir: str = option("data/default", "prepared data directory (token shards per split, meta.json)")
    inputs: list[str] = option(
        [], "raw text files, directories, globs or hf:NAME datasets that prepare reads"
    )
    text_field: str = option(
        "text", "field or column holding the text (JSONL, JSON, CSV/TSV, Parquet, hf:); dotted for nested"
    )
    txt_mode: Literal["file", "paragraph"] = option(
        "file", "TXT documents: one per file, or one per blank-line-separated paragraph"
    )
    input_weights: list[float] = option(
        [], "one weight per data.inputs entry: each input becomes a source sampled by its weight"
    )
    val_inputs: list[str] = option([], "held-out validation files (then val_ratio is not drawn)")
    test_inputs: list[str] = option([], "held-out test files (then test_ratio is not drawn)")
    sources: list[SourceConfig] = option([], "several named sources, each with its own inputs and field")
    shard_tokens: int = option(100_000_000, "tokens per shard file of a split (the resume unit)", POSITIVE)
    val_ratio: float = option(0.05, "share of documents held out for validation", FRACTION)
    test_ratio: float = option(0.0, "share of documents held out for testing", FRACTION)
    split_seed: int = option(1234, "seed of the document-level train/val/test split", NON_NEGATIVE)
    on_error: Literal["raise", "skip"] = option(
        "raise", "malformed input lines: stop with an error, or skip and count them"
    )
    hf_config: str | None = option(None, "hf: inputs: dataset configuration (subset) name")
    hf_split: str = option("train", "hf: inputs: dataset split to read")
    hf_streaming: bool = option(True, "hf: inputs from the hub: stream records instead of downloading all")
    clean_control_chars: bool = option(True, "remove control and zero-width characters (keeps \\n, \\t)")
    normalize_whitespace: bool = option(
        False, "collapse spaces and blank lines, strip line ends; keeps paragraph breaks"
    )
    min_chars: int = option(0, "drop documents shorter than this many characters; 0 disables", NON_NEGATIVE)
    max_chars: int = option(0, "drop documents longer than this many characters; 0 disables", NON_NEGATIVE)
    language: Literal["any", "ko", "en"] = option(
        "any", "keep only Hangul-heavy (ko) or Latin-heavy (en) documents, by script ratio"
    )
    min_script_ratio: float = option(
        0.5, "language filter: least share of letters in the wanted script", PROBABILITY
    )
    dedup: bool = option(False, "drop exact duplicate documents (keeps 16 bytes per document in memory)")
    near_dedup_threshold: float = option(
        0.0,
        "drop near-duplicates above this MinHash Jaccard estimate (needs datasketch); 0 disables",
        FRACTION,
    )


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "char", "word"] = option(
        "bpe", "byte-level BPE, character-level, or word-level (the decoded text joins words with spaces)"
    )
    vocab_size: int = option(8000, "vocabulary size of a trained BPE or word tokenizer", POSITIVE)
    min_frequency: int = option(2, "minimum count of a BPE merge's pair or of a word", NON_NEGATIVE)
    special_tokens: list[str] = option(SPECIAL_TOKENS, "special tokens; must hold an EOS token")
    path: str | None = option(None, "existing tokenizer.json (or its directory) to use")
    pretokenize: Literal["none", "kiwi"] = option(
        "none", "BPE: cut Korean at morpheme boundaries (kiwipiepy, pip install 'sllm[ko]') before merging"
    )
    sample_bytes: int = option(
        1_000_000_000, "train on the first this many bytes of text, taken from the sources in turn", POSITIVE
    )


@dataclass
class ModelConfig:
    arch: Literal["gpt", "ffn"] = option("gpt", "GPT decoder, or the MLP-only window baseline")
    n_layer: int = option(6, "number of transformer blocks", POSITIVE)
    n_head: int = option(6, "attention heads per block", POSITIVE)
    n_embd: int = option(384, "embedding width", POSITIVE)
    block_size: int = option(256, "context length in tokens", POSITIVE)
    dropout: float = option(0.0, "dropout probability during training", FRACTION)
    bias: bool = option(True, "biases in linear layers and norms")
    pos: Literal["learned", "sinusoidal", "rope"] = option(
        "learned", "positions: learned or sinusoidal embeddings, or rotary (RoPE) q/k rotation"
    )
    rope_base: float = option(10000.0, "RoPE: base of the rotation frequencies (HF rope_theta)", POSITIVE)
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "normalization layer of blocks and output")
    mlp: Literal["gelu", "swiglu", "relu2"] = option(
        "gelu", "MLP kind: GELU, gated SiLU (SwiGLU) or squared ReLU"
    )
    mlp_hidden: int = option(
        0, "MLP hidden width; 0 means 4 * n_embd (SwiGLU: 8/3 * n_embd, multiple of 64)", NON_NEGATIVE
    )
    qk_norm: bool = option(False, "RMSNorm of queries and keys per head before attention")
    n_kv_head: int = option(0, "key/value heads (grouped-query attention); 0 means n_head", NON_NEGATIVE)
    tie_embeddings: bool = option(True, "LM head shares the token embedding; false adds a separate lm_head")
    vocab_pad_multiple: int = option(
        1, "pad embedding rows to a multiple of this (128 is fast on GPUs)", POSITIVE
    )
    vocab_size: int = option(0, "vocabulary size; 0 takes it from the prepared data", NON_NEGATIVE)
    ffn_window: int = option(8, "ffn baseline: how many previous tokens it sees", POSITIVE)
    ffn_hidden: int = option(0, "ffn baseline: hidden width; 0 means 4 * n_embd", NON_NEGATIVE)


@dataclass
class TrainConfig:
    out_dir: str = option("runs/default", "run directory (checkpoints, metrics, samples)")
    max_steps: int = option(1000, "optimizer steps to train (unless max_tokens or epochs is set)", POSITIVE)
    max_tokens: int = option(0, "train on this many tokens instead of max_steps; 0 disables", NON_NEGATIVE)
    epochs: float = option(0.0, "train for this many epochs instead of max_steps; 0 disables", NON_NEGATIVE)
    tokens_per_epoch: int = option(0, "tokens in one epoch; 0 means the train split's size", NON_NEGATIVE)
    init_from: str | None = option(None, "start from another run's newest weights (fresh optimizer)")
    micro_batch: int | Literal["auto"] = option(
        16, "sequences per forward/backward pass; auto: the largest that fits (needs batch_size)", POSITIVE
    )
    grad_accum: int = option(
        1, "micro-batches accumulated per optimizer step (unless batch_size is set)", POSITIVE
    )
    batch_size: int = option(
        0,
        "sequences per optimizer step, all processes together; sets grad_accum; 0: micro × accum × procs",
        NON_NEGATIVE,
    )
    block_size: int = option(0, "training window length; 0 means model.block_size", NON_NEGATIVE)
    lr: float = option(6e-4, "peak learning rate", POSITIVE)
    min_lr: float = option(6e-5, "learning rate at the end of the cosine decay", NON_NEGATIVE)
    warmup_steps: int = option(100, "linear warmup steps", NON_NEGATIVE)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", NON_NEGATIVE)
    beta1: float = option(0.9, "AdamW beta1", FRACTION)
    beta2: float = option(0.95, "AdamW beta2", FRACTION)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables", NON_NEGATIVE)
    optimizer: Literal["adamw", "adafactor", "muon"] = option(
        "adamw", "AdamW; Adafactor; or Muon for block matrices with AdamW for the rest"
    )
    schedule: Literal["cosine", "wsd"] = option(
        "cosine", "warmup + cosine decay, or warmup + stable + linear decay (WSD)"
    )
    decay_fraction: float = option(0.2, "WSD: share of the steps spent decaying at the end", PROBABILITY)
    compile: bool = option(False, "torch.compile the model for training (fastest on CUDA)")
    seed: int = option(1337, "seed of initialization, batches and dropout", NON_NEGATIVE)
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to train")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto is bf16 or fp16 on GPU, fp32 on CPU"
    )
    eval_interval: int = option(200, "steps between validation evaluations; 0 disables", NON_NEGATIVE)
    eval_windows: int = option(32, "validation windows scored at each periodic evaluation", POSITIVE)
    checkpoint_interval: int = option(
        200, "steps between checkpoints (with checkpoint_every: steps)", POSITIVE
    )
    checkpoint_every: Literal["steps", "epoch"] = option(
        "steps", "save step-N every checkpoint_interval steps, or epoch-N at the end of each epoch"
    )
    keep_last: int = option(3, "periodic checkpoints kept on disk (best/ is kept apart)", POSITIVE)
    resume: Literal["auto", "never"] = option("auto", "continue from LATEST if the run has one")
    log_interval: int = option(10, "steps between metric log lines", POSITIVE)
    dist_timeout_s: int = option(600, "seconds a rank waits for the others before failing", POSITIVE)
    parallel: Literal["ddp", "fsdp"] = option(
        "ddp", "with several processes: replicate (DDP) or shard parameters and state (FSDP2)"
    )
    activation_checkpointing: bool = option(
        False, "recompute each block's activations in backward: less memory, ~1/3 more compute"
    )
    chunked_loss: bool = option(False, "fuse LM head and loss chunk by chunk; full logits never exist")


@dataclass
class EvalConfig:
    stride: int = option(0, "evaluation window stride; 0 means half the context", NON_NEGATIVE)
    batch_size: int = option(16, "windows per evaluation batch", POSITIVE)
    splits: list[str] = option(["val", "test"], "splits `sllm eval` scores when present")


def _sample_section() -> type:
    """The `sample` section: prompts sampled at each evaluation, with their seed, and the options
    a run keeps (`RUN_OPTIONS`): the defaults of `generate`, `chat`, `serve` and export for the run."""
    hints = typing.get_type_hints(SamplingParams)
    declared = {spec.name: spec for spec in dataclasses.fields(SamplingParams)}
    options = [(name, hints[name], _copy(declared[name])) for name in RUN_OPTIONS]
    return dataclasses.make_dataclass(
        "SampleConfig",
        [
            ("prompts", list[str], option([], "prompts sampled at each eval; none: the data's first words")),
            *options,
            ("seed", int, option(42, "seed of the samples at each eval", NON_NEGATIVE)),
        ],
    )


def _copy(spec: dataclasses.Field) -> Any:
    return option(spec.default, spec.metadata["help"], spec.metadata["range"])


SampleConfig = _sample_section()


@dataclass
class LogConfig:
    tensorboard: bool = option(True, "write TensorBoard events when tensorboard is installed")
    progress: bool = option(True, "show a progress bar")
    samples_at_eval: bool = option(True, "generate the fixed prompts at each evaluation")
    wandb: bool = option(False, "log to Weights & Biases (honours WANDB_MODE=offline)")
    wandb_project: str = option("sllm", "W&B project name")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _coerce(value: Any, expected: Any, key: str) -> Any:
    """Check `value` against the annotation `expected`; parse numbers given as strings."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        if value not in typing.get_args(expected):
            allowed = ", ".join(str(a) for a in typing.get_args(expected))
            raise UserError(f"config key {key} is {value!r}; allowed values: {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(expected):
            return None
        return _coerce_union(value, [a for a in typing.get_args(expected) if a is not type(None)], key)
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            fields = ", ".join(typing.get_type_hints(expected))
            raise UserError(f"config key {key} must be a mapping with the keys {fields}")
        return build_dataclass(expected, key, value)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(expected)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        number = _parsed(value, int)
        if number is not None:
            if not -(2**63) <= number < 2**63:
                raise UserError(f"config key {key} is {value!r}, too large for a 64-bit integer")
            return number
    elif expected is float:
        number = _parsed(value, float)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"config key {key} must be a finite number, got {value!r}")
            return number
    elif expected is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"config key {key} must be of type {expected.__name__}, got {value!r}")


def _parsed(value: Any, kind: type) -> Any:
    """`value` as an int or float (from a number, or a string such as "3e-4"); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float) if kind is float else int):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return None
    return None


def _coerce_union(value: Any, members: list[Any], key: str) -> Any:
    """The first member type `value` fits, e.g. `int | Literal["auto"]` takes 8, "8" and "auto"."""
    errors = []
    for member in members:
        try:
            return _coerce(value, member, key)
        except UserError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise UserError(errors[0])
    raise UserError(f"config key {key} must be one of {_type_names(members)}, got {value!r}")


def _type_names(members: list[Any]) -> str:
    names = []
    for member in members:
        if typing.get_origin(member) is Literal:
            names += [repr(a) for a in typing.get_args(member)]
        else:
            names.append(member.__name__)
    return " or ".join(names)


def build_dataclass(cls: type, section: str, values: dict[str, Any]) -> Any:
    """An instance of the config dataclass `cls` from `values`, type- and range-checked."""
    hints = typing.get_type_hints(cls)
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            valid = ", ".join(hints)
            raise UserError(f"unknown config key {section}.{key}; valid keys of {section}: {valid}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        check_range(f"config key {section}.{key}", kwargs[key], specs[key])
    return cls(**kwargs)


def dataclass_from_overrides(cls: type, section: str, overrides: list[str]) -> Any:
    """A one-section config (e.g. `sts`) from `section.key=value` overrides, type-checked."""
    values = {}
    for text in overrides:
        given, name, value = parse_override(text)
        if given != section:
            raise UserError(f"override {text!r} must use the section {section}, e.g. {section}.epochs=3")
        values[name] = value
    return build_dataclass(cls, section, values)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (a YAML file's content)."""
    if not isinstance(raw, dict):
        raise UserError("a config file must be a mapping of sections (data, model, train, ...)")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config section {section} must be a mapping of keys to values")
    cfg = Config(**{name: build_dataclass(cls, name, raw.get(name) or {}) for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """`train.lr=3e-4` → ("train", "lr", 3e-4); values are parsed as YAML scalars or lists."""
    key, sep, raw_value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw_value
    except RecursionError:
        raise UserError(f"override {key.strip()} is nested too deeply; give a plain value") from None
    return section, name, value


PRESET_DIR = resources.files("sllm") / "configs"


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a bundled preset such as `demo`."""
    path = Path(name)
    if path.is_file():
        return path
    preset = _preset(name)
    if preset is not None:
        return preset
    state = "is a directory" if path.is_dir() else "not found"
    raise UserError(f"config file {name} {state}; give a YAML path or a preset ({_preset_names()})")


def _preset(name: str) -> Path | None:
    path = Path(name)
    if path.suffix in ("", ".yaml") and (PRESET_DIR / f"{path.stem}.yaml").is_file():
        return Path(str(PRESET_DIR / f"{path.stem}.yaml"))
    return None


def _preset_names() -> str:
    return ", ".join(sorted(p.name[:-5] for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml")))


def read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sections of a YAML config over its `base:` chain (beside it, or a preset), merged mapping
    by mapping; scalars and lists are replaced whole."""
    raw = read_yaml(path, "fix the config file") or {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of sections")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    beside = path.parent / str(base)
    base_path = beside if beside.is_file() else _preset(str(base))
    if not isinstance(base, str) or base_path is None:
        raise UserError(
            f"config file {path}: base {base!r} not found as {beside} or as a preset "
            f"({_preset_names()}); give a YAML path relative to {path.name} or a preset name"
        )
    chain = (*chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path.resolve()))
        raise UserError(f"config files inherit in a cycle: {cycle}; remove one of these base: keys")
    base_raw = read_config_file(base_path, chain)
    _prompts_follow_data(base_raw, raw)
    return _merged(base_raw, raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config and its bases (or start from defaults), apply dotted overrides, validate."""
    raw = read_config_file(resolve_config_path(path)) if path else {}
    given: dict[str, dict[str, Any]] = {}
    for text in overrides or []:
        section, name, value = parse_override(text)
        given.setdefault(section, {})[name] = value
    _prompts_follow_data(raw, given)
    for section, values in given.items():
        current = raw.get(section) or {}  # not a mapping: config_from_dict names the section
        raw[section] = {**current, **values} if isinstance(current, dict) else current
    return config_from_dict(raw)


def _prompts_follow_data(under: dict[str, Any], over: dict[str, Any]) -> None:
    """A layer (a config naming this one its `base`, or the command line) that moves `data.dir`
    without prompts of its own drops the prompts written for the old data."""
    own_dir = _section(under, "data").get("dir")
    new_dir = _section(over, "data").get("dir", own_dir)
    if own_dir and Path(str(new_dir)) != Path(str(own_dir)) and "prompts" not in _section(over, "sample"):
        _section(under, "sample").pop("prompts", None)


def _section(layer: dict[str, Any], name: str) -> dict[str, Any]:
    """A section of a config layer; {} when absent or not a mapping (refused later, by name)."""
    section = layer.get(name)
    return section if isinstance(section, dict) else {}


def config_from_args(args: Namespace) -> Config:
    """A command's config: the --config file, then its shorthand flags, then the dotted overrides."""
    given = [(key, getattr(args, key)) for key in args.config_keys if getattr(args, key) is not None]
    flags = [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in given]
    return load_config(args.config, [*flags, *args.overrides])


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, config_yaml(cfg))


def validate(cfg: Config) -> None:
    """Impossible values and combinations fail here, before any data is read or model built."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for spec in dataclasses.fields(values):
            check_range(f"config key {section}.{spec.name}", getattr(values, spec.name), spec)
    m, t, d = cfg.model, cfg.train, cfg.data
    _validate_batch(t)
    if m.n_embd % m.n_head != 0:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.pos == "sinusoidal" and (m.n_embd // m.n_head) % 2 and m.n_embd % 2:
        raise UserError("model.n_embd must be even for sinusoidal positions")
    if m.pos == "rope" and (m.n_embd // m.n_head) % 2:
        raise UserError(
            f"model.pos: rope needs an even head width; n_embd / n_head is {m.n_embd // m.n_head}"
        )
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise UserError(
            f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}); 0 means n_head"
        )
    if m.arch != "gpt" and (t.activation_checkpointing or t.chunked_loss):
        raise UserError("train.activation_checkpointing and train.chunked_loss need model.arch: gpt")
    if t.block_size > m.block_size:
        raise UserError(
            f"train.block_size ({t.block_size}) is larger than the model context "
            f"model.block_size ({m.block_size}); lower it or raise model.block_size"
        )
    if cfg.eval.stride > m.block_size:
        raise UserError(f"eval.stride must be between 1 and model.block_size ({m.block_size})")
    if m.arch == "ffn" and m.ffn_window > m.block_size:
        raise UserError("model.ffn_window must not exceed model.block_size")
    if t.max_tokens and t.epochs:
        raise UserError("set train.max_tokens or train.epochs, not both")
    if t.min_lr > t.lr:
        raise UserError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if d.val_ratio + d.test_ratio >= 1:
        raise UserError("data.val_ratio and data.test_ratio must be in [0, 1) and sum below 1")
    if d.max_chars and d.max_chars < d.min_chars:
        raise UserError(f"data.max_chars ({d.max_chars}) is below data.min_chars ({d.min_chars})")
    if cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size < 256 + len(cfg.tokenizer.special_tokens):
        raise UserError("tokenizer.vocab_size must be at least 256 + the number of special tokens")
    if cfg.tokenizer.kind != "bpe" and cfg.tokenizer.pretokenize != "none":
        raise UserError("tokenizer.pretokenize applies to tokenizer.kind=bpe only; drop one of them")


def _validate_batch(t: TrainConfig) -> None:
    """micro_batch, grad_accum and batch_size: the global batch is given one way, not two."""
    if t.micro_batch == "auto" and not t.batch_size:
        raise UserError("train.micro_batch: auto needs train.batch_size, the sequences per optimizer step")
    if t.micro_batch == "auto" and t.parallel == "fsdp":
        raise UserError("train.micro_batch: auto is not available with train.parallel: fsdp; set a number")
    if t.batch_size and t.grad_accum != 1:
        raise UserError(
            "set train.batch_size or train.grad_accum, not both (batch_size sets the accumulation)"
        )
    if t.batch_size and t.micro_batch != "auto" and t.batch_size % t.micro_batch:
        raise UserError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch ({t.micro_batch})"
        )
