"""To and from the Hugging Face format: a run as a `transformers` model directory, and back.

Export writes what `from_pretrained` reads (weights, config.json, generation_config.json,
tokenizer files, a model card, the chat template as Jinja) without importing `transformers`
(only `--check` does). An `HFArchitecture` maps one family onto one HF class: GPT-2 (`Conv1D`
weights are our `nn.Linear` ones transposed) or Llama (our qkv rows split into q/k/v_proj). An
imported run continues pre-training through `sllm prepare` and `sllm train`.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sllm.atomic import ensure_writable_dir, replace_dir, temp_path, writing_to
from sllm.config import Config, ModelConfig, save_config, validate
from sllm.data.meta import META_FILE, DataMeta
from sllm.data.sources import require_module
from sllm.errors import UserError
from sllm.files import read_json
from sllm.infer.chat_template import PLAIN, ChatTemplate, load_chat_template, to_jinja
from sllm.model import build_model, count_parameters
from sllm.model.gpt import mlp_hidden_width
from sllm.progress import stages
from sllm.run import CONFIG_FILE, CheckpointMeta, LoadedRun, open_run
from sllm.tokenizer import TOKENIZER_FILE, UNK_TOKEN, HFBackedTokenizer, Tokenizer, load_tokenizer
from sllm.train.checkpoint import save_checkpoint, save_tensors, training_state
from sllm.train.distributed import full_state
from sllm.train.optim import build_optimizers

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_CONFIG = "config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"
CHECK_TOKENS = 64


@dataclass(frozen=True)
class Parameter:
    """One tensor under its sllm and HF names, maybe transposed (Conv1D) or a row range of ours."""

    ours: str
    theirs: str
    transposed: bool = False
    rows: tuple[int, int] | None = None


class HFArchitecture:
    """How one family of sllm models maps onto one `transformers` model class."""

    hf_class: str
    model_type: str
    prefix: str  # before every backbone tensor name in HF files (some files omit it)

    def problems(self, cfg: ModelConfig) -> list[str]:
        """Why `cfg` cannot be represented; empty when it can."""

    def to_hf_config(self, cfg: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
        """config.json: the family's and the common fields; EOS serves as BOS (no tokenizer: none)."""
        eos, pad = (tokenizer.eos_id, tokenizer.pad_id) if tokenizer else (None, None)
        return {
            "architectures": [self.hf_class],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            **self.shape(cfg),
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "float32",
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        }

    def shape(self, cfg: ModelConfig) -> dict[str, Any]: ...

    def from_hf_config(self, hf: dict[str, Any], source: Path) -> ModelConfig: ...

    def parameters(self, cfg: ModelConfig) -> list[Parameter]: ...

    def ignored(self, name: str) -> bool:
        """HF tensors that are not weights (saved buffers) or duplicates of tied ones."""


GPT2_BLOCK_PARTS = {
    "norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
    "norm2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj",
}  # fmt: skip


class GPT2(HFArchitecture):
    hf_class = "GPT2LMHeadModel"
    model_type = "gpt2"
    prefix = "transformer."
    # gelu_new and gelu_pytorch_tanh are both the tanh approximation our MLP uses.
    activations = ("gelu_new", "gelu_pytorch_tanh")
    layer_norm_epsilon = 1e-5  # nn.LayerNorm's default, which our model uses

    def problems(self, cfg: ModelConfig) -> list[str]:
        wanted = {
            "arch": "gpt", "pos": "learned", "bias": True, "norm": "layernorm", "mlp": "gelu",
            "mlp_hidden": 0, "qk_norm": False, "tie_embeddings": True,
        }  # fmt: skip
        problems = _mismatches(cfg, wanted, "GPT-2")
        if cfg.n_kv_head not in (0, cfg.n_head):  # 0 means one key/value head per query head
            problems.append(f"model.n_kv_head is {cfg.n_kv_head} (GPT-2 needs 0 or n_head, {cfg.n_head})")
        return problems

    def shape(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": None,
            "activation_function": self.activations[0],
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
        }

    def from_hf_config(self, hf: dict[str, Any], source: Path) -> ModelConfig:
        _require_keys(hf, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"), source, "GPT-2")
        n_embd = hf["n_embd"]
        required = {
            "activation_function": (hf.get("activation_function", "gelu_new"), self.activations),
            "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (self.layer_norm_epsilon,)),
            "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
            "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
            "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
            "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
            "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        }
        _refuse_unsupported(required, source, "GPT-2")
        return ModelConfig(
            arch="gpt",
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=n_embd,
            block_size=hf["n_positions"],
            dropout=hf.get("resid_pdrop", 0.1),  # transformers' default
            bias=True,
            pos="learned",
            vocab_size=hf["vocab_size"],
        )

    def parameters(self, cfg: ModelConfig) -> list[Parameter]:
        names = [
            Parameter("wte.weight", "wte.weight", rows=(0, cfg.vocab_size)),
            Parameter("wpe.table.weight", "wpe.weight"),
        ]
        for layer in range(cfg.n_layer):
            for ours, theirs in GPT2_BLOCK_PARTS.items():
                for kind in ("weight", "bias"):
                    ours_name, theirs_name = f"blocks.{layer}.{ours}.{kind}", f"h.{layer}.{theirs}.{kind}"
                    transposed = kind == "weight" and not ours.startswith("norm")  # Conv1D, not LayerNorm
                    names.append(Parameter(ours_name, theirs_name, transposed))
        names += [Parameter(f"norm_f.{kind}", f"ln_f.{kind}") for kind in ("weight", "bias")]
        return names

    def ignored(self, name: str) -> bool:
        # Older checkpoints save the causal-mask buffers `attn.bias` and `attn.masked_bias`.
        return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))


class Llama(HFArchitecture):
    hf_class = "LlamaForCausalLM"
    model_type = "llama"
    prefix = ""  # the backbone sits under `model.`, the head beside it; names below are full
    rms_norm_eps = 1e-5  # sllm's RMSNorm epsilon

    def problems(self, cfg: ModelConfig) -> list[str]:
        wanted = {
            "arch": "gpt", "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
            "qk_norm": False,
        }  # fmt: skip
        return _mismatches(cfg, wanted, "Llama")

    def shape(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "hidden_size": cfg.n_embd,
            "intermediate_size": mlp_hidden_width(cfg),
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": cfg.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
        }

    def from_hf_config(self, hf: dict[str, Any], source: Path) -> ModelConfig:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        _require_keys(hf, (*keys, "max_position_embeddings"), source, "Llama")
        rope = hf.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        required = {
            "hidden_act": (hf.get("hidden_act", "silu"), ("silu",)),
            "rms_norm_eps": (hf.get("rms_norm_eps", 1e-6), (self.rms_norm_eps,)),
            "attention_bias": (hf.get("attention_bias", False), (False,)),
            "mlp_bias": (hf.get("mlp_bias", False), (False,)),
            "head_dim": (hf.get("head_dim") or head_dim, (head_dim,)),
            "rope_type": (rope.get("rope_type", "default"), ("default",)),
            "rope_scaling": (hf.get("rope_scaling"), (None,)),
        }
        _refuse_unsupported(required, source, "Llama")
        return ModelConfig(
            arch="gpt",
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            block_size=hf["max_position_embeddings"],
            dropout=hf.get("attention_dropout", 0.0),
            bias=False,
            pos="rope",
            rope_base=float(rope_theta),
            norm="rmsnorm",
            mlp="swiglu",
            mlp_hidden=hf["intermediate_size"],
            tie_embeddings=hf.get("tie_word_embeddings", True),
            vocab_size=hf["vocab_size"],
        )

    def parameters(self, cfg: ModelConfig) -> list[Parameter]:
        width = cfg.n_embd
        kv_width = (cfg.n_kv_head or cfg.n_head) * (width // cfg.n_head)
        ends = (0, width, width + kv_width, width + 2 * kv_width)  # q, k, v rows of our qkv
        names = [Parameter("wte.weight", "model.embed_tokens.weight", rows=(0, cfg.vocab_size))]
        for layer in range(cfg.n_layer):
            ours, theirs = f"blocks.{layer}.", f"model.layers.{layer}."
            names.append(Parameter(ours + "norm1.weight", theirs + "input_layernorm.weight"))
            names += [
                Parameter(ours + "attn.qkv.weight", f"{theirs}self_attn.{part}_proj.weight", rows=rows)
                for part, rows in zip("qkv", itertools.pairwise(ends), strict=True)
            ]
            names.append(Parameter(ours + "attn.proj.weight", theirs + "self_attn.o_proj.weight"))
            names.append(Parameter(ours + "norm2.weight", theirs + "post_attention_layernorm.weight"))
            for mine, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                names.append(Parameter(f"{ours}mlp.{mine}.weight", f"{theirs}mlp.{hf_name}.weight"))
        names.append(Parameter("norm_f.weight", "model.norm.weight"))
        if not cfg.tie_embeddings:
            names.append(Parameter("lm_head.weight", "lm_head.weight", rows=(0, cfg.vocab_size)))
        return names

    def ignored(self, name: str) -> bool:
        # A tied head some files still save; the rotary frequencies older versions saved.
        return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")


def _require_keys(hf: dict[str, Any], keys: tuple[str, ...], source: Path, family: str) -> None:
    absent = [key for key in keys if key not in hf]
    if absent:
        raise UserError(
            f"{source / HF_CONFIG} lacks {', '.join(absent)}; it is not a complete {family} config"
        )


def _mismatches(cfg: ModelConfig, wanted: dict[str, Any], family: str) -> list[str]:
    return [
        f"model.{key} is {getattr(cfg, key)} ({family} needs {value})"
        for key, value in wanted.items()
        if getattr(cfg, key) != value
    ]


def _refuse_unsupported(required: dict[str, tuple[Any, tuple]], source: Path, family: str) -> None:
    """`required` maps config.json keys to (their value, the values sllm can reproduce)."""
    unsupported = [
        f"{key}={value} (sllm needs {' or '.join(map(str, allowed))})"
        for key, (value, allowed) in required.items()
        if value not in allowed
    ]
    if unsupported:
        raise UserError(
            f"{source / HF_CONFIG} describes a {family} that sllm's GPT cannot reproduce: "
            f"{'; '.join(unsupported)}"
        )


ARCHITECTURES: dict[str, HFArchitecture] = {"gpt2": GPT2(), "llama": Llama()}


# ---- export -------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> Path:
    """Write the run's weights, config, tokenizer and model card as an HF model directory."""
    out = Path(out_dir)
    _require_empty(out)
    ensure_writable_dir(out.parent, "export")
    run = open_run(run_dir, torch.device("cpu"), checkpoint)
    architecture = architecture_for(run.config.model, run.path)
    if not isinstance(run.tokenizer, HFBackedTokenizer):
        raise UserError(
            f"{run.path} uses a character-level tokenizer, which has no Hugging Face format; "
            "export a run trained with tokenizer.kind=bpe or word"
        )
    if run.tokenizer.pretokenize != "none":
        raise UserError(
            f"{run.path}'s tokenizer cuts Korean at morphemes with {run.tokenizer.pretokenize}, which "
            "`transformers` cannot run, so its ids would differ; export a run with tokenizer.pretokenize=none"
        )
    template = load_chat_template(run.path)
    chat_jinja = None if template == PLAIN else to_jinja(template)
    weights = _to_hf_state(architecture, run.config.model, run.model.state_dict())
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_to(out.parent, f"export {out.name}"):
        tmp.mkdir(parents=True)
        try:
            save_tensors(weights, tmp / HF_WEIGHTS, metadata={"format": "pt"})
            _write_json(tmp / HF_CONFIG, architecture.to_hf_config(run.config.model, run.tokenizer))
            _write_json(tmp / "generation_config.json", _generation_config(run, template))
            _write_tokenizer_files(tmp, run.tokenizer, run.config.model.block_size, chat_jinja)
            (tmp / "README.md").write_text(model_card(run, architecture, chat_jinja is not None), "utf-8")
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _to_hf_state(
    architecture: HFArchitecture, cfg: ModelConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our tensors under HF's names: row ranges cut out, Conv1D weights transposed."""
    hf_state = {}
    for p in architecture.parameters(cfg):
        tensor = state[p.ours] if p.rows is None else state[p.ours][p.rows[0] : p.rows[1]]
        hf_state[architecture.prefix + p.theirs] = (tensor.t() if p.transposed else tensor).contiguous()
    return hf_state


def _require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new --out or remove it")


def architecture_for(cfg: ModelConfig, what: object, target: str = "Hugging Face") -> HFArchitecture:
    """The family `cfg` belongs to; else a UserError naming, per family, what stands in the way."""
    reasons = []
    for architecture in ARCHITECTURES.values():
        problems = architecture.problems(cfg)
        if not problems:
            return architecture
        reasons.append(f"{architecture.hf_class}: {', '.join(problems)}")
    raise UserError(f"{what} has no {target} equivalent ({'; '.join(reasons)})")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_config(run: LoadedRun, template: ChatTemplate) -> dict[str, Any]:
    """The run's `sample` settings and where to stop. No `max_length`: transformers warns when users
    pass `max_new_tokens`, and `model_max_length` states the context already."""
    eos = run.tokenizer.eos_id
    eos_ids, stop_strings = stop_tokens(run.tokenizer, template)
    config: dict[str, Any] = {
        "bos_token_id": eos,
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos,
        "pad_token_id": run.tokenizer.pad_id,
    }
    if stop_strings:
        config["stop_strings"] = stop_strings
    s = run.config.sample
    if s.temperature > 0:
        config |= {"do_sample": True, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
    if s.repetition_penalty != 1.0:
        config["repetition_penalty"] = s.repetition_penalty
    if s.min_new_tokens:  # HF holds back every eos_token_id, as sllm does EOS and one-token stops
        config["min_new_tokens"] = s.min_new_tokens
    return config


def stop_tokens(tokenizer: Tokenizer, template: ChatTemplate) -> tuple[list[int], list[str]]:
    """Where HF `generate` stops: EOS and one-token stop strings as `eos_token_id`; longer ones as
    `stop_strings`, honoured only when `generate` gets the tokenizer (the model card passes it)."""
    ids, strings = [tokenizer.eos_id], []
    for stop in template.stop:
        encoded = tokenizer.encode(stop)
        if len(encoded) != 1:
            strings.append(stop)
        elif encoded[0] not in ids:
            ids.append(encoded[0])
    return ids, strings


def _write_tokenizer_files(out: Path, tokenizer: Tokenizer, block_size: int, chat_jinja: str | None) -> None:
    """tokenizer.json and what `AutoTokenizer` needs to build a fast tokenizer, with the chat template."""
    tokenizer.save(out)
    eos, pad = tokenizer.decode([tokenizer.eos_id]), tokenizer.decode([tokenizer.pad_id])
    unk = UNK_TOKEN if tokenizer.token_id(UNK_TOKEN) is not None else eos  # word-level has one
    special = {"bos_token": eos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    _write_json(out / "special_tokens_map.json", special)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    if chat_jinja is not None:
        config["chat_template"] = chat_jinja
        (out / HF_CHAT_TEMPLATE).write_text(chat_jinja, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)


def model_card(run: LoadedRun, architecture: HFArchitecture, chat: bool) -> str:
    """README.md: what the model is, its data, its scores and how to prompt it."""
    cfg, meta = run.config, run.checkpoint.meta
    m = cfg.model
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [sllm, {architecture.model_type}]",
        "---",
        "",
        f"# {run.path.name}",
        "",
        f"A {architecture.hf_class} trained with sllm: "
        f"{count_parameters(run.model) / 1e6:.2f}M parameters, {m.n_layer} layers, {m.n_head} heads, "
        f"width {m.n_embd}, context {m.block_size} tokens, vocabulary {m.vocab_size}.",
        "",
        "## Training",
        "",
        f"- checkpoint: `{run.checkpoint.path.name}`, step {meta.step:,}, {meta.tokens_seen:,} tokens seen",
    ]
    if meta.imported_from:
        lines.append(f"- started from the Hugging Face model in `{meta.imported_from}`")
    if meta.val_loss is not None:
        lines.append(
            f"- validation loss {meta.val_loss:.4f} (perplexity {math.exp(meta.val_loss):.2f}), "
            f"estimated on {cfg.train.eval_windows} windows of the validation split"
        )
    lines += ["", *_data_lines(cfg), "", "## Use", "", "```python", *USAGE, *(CHAT_USE if chat else TEXT_USE)]
    return "\n".join(lines) + "\n```\n"


def _data_lines(cfg: Config) -> list[str]:
    """The training inputs and token counts, from the prepared data's meta.json if it is here."""
    if not (Path(cfg.data.dir) / META_FILE).is_file():
        return ["## Data", "", f"The prepared data (`{cfg.data.dir}`) was not available at export time."]
    meta = DataMeta.read(cfg.data.dir)
    lines = ["## Data", "", "| input | bytes |", "|---|---:|"]
    for source in meta.input_files():
        size = "?" if source.bytes is None else f"{source.bytes:,}"  # a dataset named on the hub
        lines.append(f"| `{Path(source.path).name}` | {size} |")
    lines.append("")
    for split, counts in meta.splits.items():
        if counts.tokens:
            lines.append(f"- {split}: {counts.documents:,} documents, {counts.tokens:,} tokens")
    return lines


USAGE = [
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
    'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
]
TEXT_USE = [
    'inputs = tokenizer("대한민국은", return_tensors="pt")',
    "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))",
]
CHAT_USE = [
    'messages = [{"role": "user", "content": "대한민국의 수도는?"}]',
    "inputs = tokenizer.apply_chat_template(",
    '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
    ")",
    "new = model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=40)",
    "reply = new[0, inputs['input_ids'].size(1) :]",
    "print(tokenizer.decode(reply, skip_special_tokens=True))",
]


def check_export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> float:
    """Load the export with `transformers`; the largest |logit difference| on sample text."""
    with stages("check export", 4) as step:
        step("importing transformers")
        transformers = require_module("transformers", "--check", extra="hf")
        step("loading the run")
        run = open_run(run_dir, torch.device("cpu"), checkpoint)
        step("loading the export")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
        step("comparing logits")
        generator = torch.Generator().manual_seed(0)
        length = min(CHECK_TOKENS, run.config.model.block_size)
        tokens = torch.randint(0, run.config.model.vocab_size, (1, length), generator=generator)
        with torch.no_grad():
            return float((hf_model(tokens).logits - run.model(tokens)).abs().max())


def to_transformers(model: torch.nn.Module, **config_overrides: Any) -> torch.nn.Module:
    """`model`'s weights in the matching `transformers` class, in eval mode, for comparing the two
    in one process; `config_overrides` set config fields (e.g. `attn_implementation="sdpa"`)."""
    transformers = require_module("transformers", "a transformers copy of the model", extra="hf")
    cfg = model.cfg
    architecture = architecture_for(cfg, "this model")
    hf_config = architecture.to_hf_config(cfg, None) | config_overrides
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    hf_model = getattr(transformers, architecture.hf_class)(config)
    state = _to_hf_state(architecture, cfg, model.state_dict())
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if unexpected or any(not architecture.ignored(name) for name in missing):
        raise RuntimeError(f"weight names do not map: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    return hf_model.eval()


# ---- import -------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Make a run directory (config, tokenizer, step-0 checkpoint) from an HF model directory."""
    source, out = Path(hf_dir), Path(out_dir)
    _require_empty(out)
    ensure_writable_dir(out.parent, "imported run")
    hf_config = _read_hf_config(source)
    architecture = ARCHITECTURES.get(hf_config.get("model_type", ""))
    # model_type and architectures (where given) must agree, or the config is not one we know
    if architecture is None or architecture.hf_class not in hf_config.get(
        "architectures", [architecture.hf_class]
    ):
        known = ", ".join(a.hf_class for a in ARCHITECTURES.values())
        raise UserError(
            f"{source} holds a {hf_config.get('model_type')!r} model; sllm can import {known} models"
        )
    if not (source / TOKENIZER_FILE).is_file():
        raise UserError(
            f"{source} has no {TOKENIZER_FILE}; write one with transformers: "
            f"AutoTokenizer.from_pretrained('{source}').save_pretrained('{source}')"
        )
    tokenizer = load_tokenizer(source)
    model_cfg = architecture.from_hf_config(hf_config, source)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer in {source} has {tokenizer.vocab_size} tokens but the model only "
            f"{model_cfg.vocab_size} embeddings; they do not belong together"
        )
    with stages("import", 3) as step:
        step("reading the weights")
        model = build_model(model_cfg)
        model.load_state_dict(_to_sllm_state(architecture, model_cfg, read_hf_weights(source), source))
        step("building the optimizer state")
        cfg = Config(model=model_cfg)
        cfg.data.dir, cfg.tokenizer.path = str(Path("data") / out.name), str(out / TOKENIZER_FILE)
        cfg.train.out_dir = str(out)
        validate(cfg)
        out.mkdir(parents=True, exist_ok=True)
        with writing_to(out, "imported run"):
            tokenizer.save(out)
            save_config(cfg, out / CONFIG_FILE)
        optimizer_state = full_state(model, build_optimizers(model, cfg.train, torch.device("cpu")))[1]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train_state = training_state(optimizer_state, scaler, 0, 0, math.inf)
        meta = CheckpointMeta(
            step=0,
            model_config=asdict(model_cfg),
            tokenizer_sha256=tokenizer.sha256,
            imported_from=str(source.resolve()),
        )
        step("writing the checkpoint")
        save_checkpoint(out, model.state_dict(), train_state, meta, keep_last=cfg.train.keep_last)
    return out


def _read_hf_config(source: Path) -> dict[str, Any]:
    path = source / HF_CONFIG
    if not path.is_file():
        raise UserError(f"{source} is not a Hugging Face model directory (no {HF_CONFIG}); check --hf")
    config = read_json(path, "download the model again")
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged (not a JSON object); download the model again")
    return config


def read_hf_weights(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (single or sharded), else of pytorch_model.bin."""
    if (source / HF_WEIGHTS).is_file():
        return _load_safetensors(source / HF_WEIGHTS)
    if (source / HF_WEIGHTS_INDEX).is_file():
        index = json.loads((source / HF_WEIGHTS_INDEX).read_text(encoding="utf-8"))
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            weights |= _load_safetensors(source / shard)
        return weights
    if (source / HF_TORCH_WEIGHTS).is_file():
        try:
            return torch.load(source / HF_TORCH_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"{source / HF_TORCH_WEIGHTS} cannot be loaded safely: {exc}".splitlines()[0]
            ) from None
    raise UserError(f"{source} has no {HF_WEIGHTS} or {HF_TORCH_WEIGHTS}; download the weights too")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as problem:
        reason = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
        raise UserError(f"{path} is damaged or incomplete ({reason}); download it again") from None


def _to_sllm_state(
    architecture: HFArchitecture, cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path
) -> dict[str, torch.Tensor]:
    """Rename (and un-transpose) HF tensors to ours; check that they are all there."""
    named = {name.removeprefix(architecture.prefix): tensor for name, tensor in weights.items()}
    parameters = architecture.parameters(cfg)
    missing = [p.theirs for p in parameters if p.theirs not in named]
    expected = {p.theirs for p in parameters}
    unexpected = [n for n in named if n not in expected and not architecture.ignored(n)]
    if missing or unexpected:
        listed = ", ".join((missing + unexpected)[:3])
        raise UserError(f"the weights in {source} do not match its {HF_CONFIG} (e.g. {listed})")
    head = named.get("lm_head.weight")
    embedding = next(p.theirs for p in parameters if p.ours == "wte.weight")
    if head is not None and "lm_head.weight" not in expected and not torch.equal(head, named[embedding]):
        raise UserError(f"{source} has an LM head that is not tied to the token embedding; sllm ties them")
    pieces: dict[str, list[torch.Tensor]] = {}
    for p in parameters:
        pieces.setdefault(p.ours, []).append(named[p.theirs].t() if p.transposed else named[p.theirs])
    return {ours: torch.cat(tensors).float().contiguous() for ours, tensors in pieces.items()}
