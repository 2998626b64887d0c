"""A run as one GGUF file for llama.cpp, Ollama and LM Studio: weights, shape and tokenizer.

Written with the `gguf` package's GGUFWriter. The family is the HF export's (GPT-2 → `gpt2`,
Llama-style → `llama`). Padded vocabulary rows are cut, and `llama`'s q and k rows are permuted
per head: llama.cpp rotates adjacent pairs where sllm, like HF, rotates halves. 1-D tensors stay
f32 and a matrix q8_0 cannot cut into blocks of 32 falls back to f16, as in llama.cpp's own
converter. The tokenizer goes as llama.cpp's `gpt2` BPE (no NFC there: decomposed Hangul
encodes differently). `check_gguf` compares the file in llama-cpp-python with sllm.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sllm.atomic import ensure_writable_dir, temp_path
from sllm.data.sources import require_module
from sllm.errors import UserError
from sllm.export import architecture_for, stop_tokens
from sllm.infer.chat_template import PLAIN, load_chat_template, to_jinja
from sllm.infer.engine import stream_tokens
from sllm.model.gpt import mlp_hidden_width
from sllm.run import LoadedRun, open_run
from sllm.sampling import SamplingParams
from sllm.tokenizer import BPETokenizer

DTYPES = ("f32", "f16", "bf16", "q8_0")
BLOCK_NAMES = {
    "norm1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output", "norm2": "ffn_norm",
    "mlp.fc": "ffn_up", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.proj": "ffn_down",
}  # fmt: skip
TOP_NAMES = {
    "wte.weight": "token_embd.weight", "wpe.table.weight": "position_embd.weight",
    "lm_head.weight": "output.weight",
    "norm_f.weight": "output_norm.weight", "norm_f.bias": "output_norm.bias",
}  # fmt: skip
CHECK_PROMPT = "대한민국은"


def gguf_tensors(run: LoadedRun, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names and in its layout (see the module docstring)."""
    cfg = run.config.model
    tensors = {}
    for name, tensor in run.model.state_dict().items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        tensors[f"blk.{block[1]}.{BLOCK_NAMES[block[2]]}.{block[3]}" if block else TOP_NAMES[name]] = tensor
    for name in ("token_embd.weight", "output.weight"):
        if name in tensors:
            tensors[name] = tensors[name][: cfg.vocab_size]
    if arch == "llama":
        n_kv_head, head_dim = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        for layer in range(cfg.n_layer):
            q, k, v = tensors.pop(f"blk.{layer}.attn_qkv.weight").split(
                [cfg.n_embd, n_kv_head * head_dim, n_kv_head * head_dim]
            )
            tensors[f"blk.{layer}.attn_q.weight"] = interleave_rope_rows(q, cfg.n_head)
            tensors[f"blk.{layer}.attn_k.weight"] = interleave_rope_rows(k, n_kv_head)
            tensors[f"blk.{layer}.attn_v.weight"] = v
    return tensors


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    return weight.reshape(heads, 2, -1, weight.size(-1)).transpose(1, 2).reshape(weight.shape)


def export_gguf(
    run_dir: str | Path, out_file: str | Path, checkpoint: str = "latest", dtype: str = "f16"
) -> Path:
    """Write the run's checkpoint as a GGUF file, its 2-D weights in `dtype`."""
    gguf = require_module("gguf", "--format gguf", extra="gguf")
    out = Path(out_file)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out or remove it")
    ensure_writable_dir(out.parent, "export")
    run = open_run(run_dir, torch.device("cpu"), checkpoint)
    arch = architecture_for(run.config.model, run.path, "GGUF").model_type
    plain_bpe = isinstance(run.tokenizer, BPETokenizer) and run.tokenizer.pretokenize == "none"
    spec = json.loads(run.tokenizer.to_json()) if plain_bpe else {}  # a morpheme cut is sllm's own
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex", True):
        raise UserError(
            f"{run.path} does not use a byte-level BPE tokenizer without a morpheme cut, the only kind sllm "
            "can express in llama.cpp's terms; export a run trained with tokenizer.kind=bpe, pretokenize=none"
        )
    tmp = temp_path(out)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_metadata(writer, gguf, run, arch, dtype, spec["model"]["merges"])
        qtype = gguf.GGMLQuantizationType[dtype.upper()]
        for name, tensor in gguf_tensors(run, arch).items():
            data = tensor.float().numpy()
            wanted = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
            try:
                writer.add_tensor(name, gguf.quants.quantize(data, wanted), raw_dtype=wanted)
            except gguf.quants.QuantError:  # rows not a multiple of q8_0's block of 32
                writer.add_tensor(name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_metadata(writer, gguf, run: LoadedRun, arch: str, dtype: str, merges: list) -> None:
    """Hyperparameters under `arch`'s keys, then the tokenizer as llama.cpp's `gpt2` BPE."""
    cfg, tokenizer = run.config.model, run.tokenizer
    writer.add_name(run.path.name)
    writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype])  # gguf.LlamaFileType
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(mlp_hidden_width(cfg))
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_head_count_kv(cfg.n_kv_head or cfg.n_head)
        writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_layer_norm_rms_eps(run.model.norm_f.eps)
    else:
        writer.add_layer_norm_eps(run.model.norm_f.eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    hf = tokenizer.hf
    special = {token.content for token in hf.get_added_tokens_decoder().values() if token.special}
    tokens = [hf.id_to_token(i) for i in range(tokenizer.vocab_size)]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    unused = range(tokenizer.vocab_size, cfg.vocab_size)  # embedding rows no token uses
    writer.add_token_list(tokens + [f"<|unused{i}|>" for i in unused])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(unused))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    template = load_chat_template(run.path)
    if template != PLAIN:
        writer.add_chat_template(to_jinja(template))
        stop_ids = stop_tokens(tokenizer, template)[0]
        if len(stop_ids) > 1:  # the template's one-token end of turn; llama.cpp stops there too
            writer.add_eot_token_id(stop_ids[1])


@dataclass(frozen=True)
class GGUFParity:
    """How llama.cpp's run of the file compares with sllm's run of the checkpoint."""

    same_prompt_tokens: bool
    max_logit_difference: float
    greedy_tokens_equal: int  # leading tokens of the two greedy continuations that agree
    greedy_tokens: int


def check_gguf(
    run_dir: str | Path,
    path: str | Path,
    checkpoint: str = "latest",
    prompt: str = CHECK_PROMPT,
    new_tokens: int = 24,
) -> GGUFParity:
    """Greedy continuations in llama-cpp-python and sllm, and the largest |logit difference|."""
    llama_cpp = require_module("llama_cpp", "checking a GGUF file", extra="llama-cpp")
    run = open_run(run_dir, torch.device("cpu"), checkpoint)
    block_size = run.config.model.block_size
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=block_size,
        logits_all=True,
        verbose=False,
        n_threads=torch.get_num_threads(),
    )
    ours_prompt = run.tokenizer.encode(prompt)
    theirs_prompt = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
    new_tokens = min(new_tokens, block_size - len(ours_prompt))
    llm.eval(ours_prompt)
    theirs = []
    for _ in range(new_tokens):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs[-1:])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    ours = list(stream_tokens(run.model, ours_prompt, params, eos_id=None, device=torch.device("cpu")))
    with torch.no_grad():
        ours_logits = run.model(torch.tensor([ours_prompt + theirs]))[0].numpy()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    return GGUFParity(
        same_prompt_tokens=ours_prompt == theirs_prompt,
        max_logit_difference=float(np.abs(llm.scores[: llm.n_tokens] - ours_logits).max()),
        greedy_tokens_equal=agree,
        greedy_tokens=len(ours),
    )
