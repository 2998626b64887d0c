"""GGUF export: the file read back with the `gguf` package's GGUFReader holds the checkpoint's
tensors, shape and tokenizer; the RoPE row order llama.cpp expects; refusals; and (slow) the
real llama-cpp-python tokenizing, scoring and continuing text exactly as sllm does."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sllm.cli import main
from sllm.config import ModelConfig
from sllm.errors import UserError
from sllm.export_gguf import check_gguf, export_gguf, interleave_rope_rows
from sllm.infer.chat_template import (
    END_TOKEN,
    SFT_TEMPLATE,
    save_chat_template,
    to_jinja,
    with_template_tokens,
)
from sllm.model.gpt import RotaryPositions
from sllm.run import open_run
from sllm.tokenizer import CharTokenizer, train_word
from sllm.train.trainer import train

from .conftest import random_run, tiny_config
from .test_cli import assert_one_line_error, sllm
from .test_export import LLAMA

gguf = pytest.importorskip("gguf")
CPU = torch.device("cpu")
TEXTS = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "The quick brown fox jumps over the lazy dog; it's 2026, isn't it?  Spaces\tand\nnewlines.",
]


def _fields(path: Path) -> tuple[dict, dict]:
    """The file's metadata values and its tensors by name."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_gpt2_gguf_holds_the_checkpoint_shape_and_tokenizer(trained_run, tmp_path):
    out = export_gguf(trained_run, tmp_path / "tiny.gguf", dtype="f32")
    fields, tensors = _fields(out)
    run = open_run(trained_run, CPU)
    hf = run.tokenizer.hf
    assert fields["general.architecture"] == "gpt2"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {
        "gpt2.context_length": 32, "gpt2.embedding_length": 64, "gpt2.block_count": 2,
        "gpt2.feed_forward_length": 256, "gpt2.attention.head_count": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": run.tokenizer.eos_id,
        "tokenizer.ggml.bos_token_id": run.tokenizer.eos_id, "tokenizer.ggml.add_bos_token": False,
    }  # fmt: skip
    assert {key: fields[key] for key in expected} == expected
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.tokens"] == [hf.id_to_token(i) for i in range(run.tokenizer.vocab_size)]
    assert fields["tokenizer.ggml.token_type"][run.tokenizer.eos_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][300] == gguf.TokenType.NORMAL
    merges = json.loads(run.tokenizer.to_json())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] and len(merges) > 200
    state = run.model.state_dict()
    pairs = {
        "token_embd.weight": state["wte.weight"][: run.config.model.vocab_size],
        "position_embd.weight": state["wpe.table.weight"],
        "blk.1.attn_qkv.weight": state["blocks.1.attn.qkv.weight"],
        "blk.1.attn_qkv.bias": state["blocks.1.attn.qkv.bias"],
        "blk.0.ffn_down.weight": state["blocks.0.mlp.proj.weight"],
        "output_norm.bias": state["norm_f.bias"],
    }
    assert len(tensors) == len(state) == 2 + 2 + 2 * 12  # no output.weight: llama.cpp ties it
    for name, ours in pairs.items():
        np.testing.assert_array_equal(tensors[name].data, ours.numpy(), err_msg=name)


def test_llama_gguf_splits_qkv_and_permutes_q_and_k_for_llama_cpp_rope(tokenizer, tmp_path):
    options = [
        "model.n_kv_head=2",
        "model.vocab_pad_multiple=384",
        "model.rope_base=500",
        "model.tie_embeddings=false",
    ]
    run_dir = random_run(tmp_path / "run", tokenizer, *LLAMA, *options)
    fields, tensors = _fields(export_gguf(run_dir, tmp_path / "llama.gguf", dtype="f16"))
    expected = {
        "general.architecture": "llama", "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 500.0, "llama.feed_forward_length": 192,
        "llama.vocab_size": tokenizer.vocab_size, "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
    }  # fmt: skip
    assert {key: fields[key] for key in expected} == expected
    state = open_run(run_dir, CPU).model.state_dict()
    q, k, v = state["blocks.0.attn.qkv.weight"].split([64, 32, 32])
    pairs = {
        "blk.0.attn_q.weight": interleave_rope_rows(q, 4), "blk.0.attn_k.weight": interleave_rope_rows(k, 2),
        "blk.0.attn_v.weight": v, "blk.1.ffn_gate.weight": state["blocks.1.mlp.gate.weight"],
        "token_embd.weight": state["wte.weight"][: tokenizer.vocab_size],
        "output.weight": state["lm_head.weight"][: tokenizer.vocab_size],
    }  # fmt: skip
    for name, ours in pairs.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F16
        np.testing.assert_array_equal(tensors[name].data, ours.half().numpy(), err_msg=name)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "blk.0.attn_qkv.weight" not in tensors


def test_an_sft_runs_chat_template_and_end_of_turn_go_into_the_file(tokenizer, tmp_path):
    chat_tokenizer = with_template_tokens(tokenizer)
    run_dir = random_run(tmp_path / "run", chat_tokenizer)
    save_chat_template(run_dir, SFT_TEMPLATE)
    fields = _fields(export_gguf(run_dir, tmp_path / "sft.gguf"))[0]
    assert fields["tokenizer.chat_template"] == to_jinja(SFT_TEMPLATE)
    assert fields["tokenizer.ggml.eot_token_id"] == chat_tokenizer.token_id(END_TOKEN)
    assert fields["tokenizer.ggml.token_type"][chat_tokenizer.token_id(END_TOKEN)] == gguf.TokenType.CONTROL
    assert (
        "tokenizer.chat_template"
        not in _fields(export_gguf(random_run(tmp_path / "plain", tokenizer), tmp_path / "p.gguf"))[0]
    )


def test_permuted_rows_under_adjacent_pair_rope_give_our_rotated_heads():
    """llama.cpp's `llama` rotates (x[2i], x[2i+1]) by position · base^(-2i/d); sllm rotates
    (x[i], x[i + d/2]). Permuting the projection's rows must make the two agree."""
    heads, head_dim, positions = 2, 8, torch.arange(5)
    cfg = ModelConfig(n_head=heads, n_embd=heads * head_dim, block_size=8, pos="rope", rope_base=100.0)
    weight, x = torch.randn(heads * head_dim, 16), torch.randn(5, 16)
    ours = RotaryPositions(cfg).rotation(positions)((x @ weight.T).view(5, heads, head_dim).transpose(0, 1))
    pairs = (x @ interleave_rope_rows(weight, heads).T).view(5, heads, head_dim // 2, 2)
    angle = positions[:, None, None] * 100.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
    even, odd = pairs[..., 0], pairs[..., 1]
    theirs = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1)
    torch.testing.assert_close(interleave_rope_rows(ours.transpose(0, 1).reshape(5, -1).T, heads).T,
                               theirs.reshape(5, -1))  # fmt: skip


def test_q8_0_and_bf16_store_what_the_formats_round_to(trained_run, tmp_path):
    wte = open_run(trained_run, CPU).model.state_dict()["wte.weight"].numpy()
    f32 = export_gguf(trained_run, tmp_path / "f32.gguf", dtype="f32")
    q8 = _fields(export_gguf(trained_run, tmp_path / "q8.gguf", dtype="q8_0"))[1]["token_embd.weight"]
    assert q8.tensor_type == gguf.GGMLQuantizationType.Q8_0
    dequantized = gguf.quants.dequantize(q8.data, q8.tensor_type)
    block_max = np.abs(wte.reshape(-1, 32)).max(axis=1).reshape(wte.shape[0], -1).repeat(32, axis=1)
    # half a step of 8 bits, plus the rounding of the block's scale to f16
    assert (np.abs(dequantized - wte) <= block_max / 127 * 0.5 + np.abs(wte) * 2**-10).all()
    assert np.abs(dequantized - wte).max() > 0
    assert (tmp_path / "q8.gguf").stat().st_size < 0.4 * f32.stat().st_size
    bf16 = _fields(export_gguf(trained_run, tmp_path / "bf16.gguf", dtype="bf16"))[1]["token_embd.weight"]
    expected = torch.from_numpy(wte).bfloat16().float().numpy()
    np.testing.assert_array_equal(gguf.quants.dequantize(bf16.data, bf16.tensor_type), expected)


def test_cli_writes_the_file_and_refuses_what_gguf_cannot_hold(trained_run, tokenizer, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    main(["export", "--run", str(trained_run), "--out", str(out), "--format", "gguf"])
    assert f"exported {trained_run} to {out}" in capsys.readouterr().out
    assert _fields(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    for argv, message in [
        (["--out", str(out), "--format", "gguf"], "m.gguf already exists; choose a new --out"),
        (["--out", str(tmp_path / "hf"), "--dtype", "f16"], "--dtype applies to --format gguf only"),
    ]:
        with pytest.raises(SystemExit):
            main(["export", "--run", str(trained_run), *argv])
        assert message in capsys.readouterr().err
    qk_norm = random_run(tmp_path / "qk", tokenizer, *LLAMA, "model.qk_norm=true")
    refused = sllm("export", "--run", qk_norm, "--out", tmp_path / "qk.gguf", "--format", "gguf")
    assert_one_line_error(refused, "has no GGUF equivalent", "model.qk_norm is True (Llama needs False)")
    words = train_word(iter(["가 나 다 라"] * 2), 10, ["<|endoftext|>"])
    for name, other in (("char", CharTokenizer(["<|endoftext|>"], list("가나다"))), ("word", words)):
        with pytest.raises(UserError, match="does not use a byte-level BPE tokenizer"):
            export_gguf(random_run(tmp_path / name, other), tmp_path / f"{name}.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["m.gguf"]


# ---- llama-cpp-python (slow: a source build, see README's "llama.cpp / Ollama") -------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, prepared_dir) -> Path:
    """A briefly trained Llama-style run (so greedy choices are not ties between near-uniform
    logits) with its own output matrix (the GPT-2 run has the tied one)."""
    run_dir = tmp_path_factory.mktemp("runs") / "llama"
    cfg = tiny_config(
        prepared_dir,
        run_dir,
        *LLAMA,
        "model.n_kv_head=2",
        "model.tie_embeddings=false",
        "train.max_steps=120",
    )
    train(cfg, log=lambda _: None)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_tokenizes_scores_and_continues_like_sllm(trained_run, llama_run, tmp_path, family, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    run_dir = trained_run if family == "gpt2" else llama_run
    path = export_gguf(run_dir, tmp_path / "m.gguf", dtype=dtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, verbose=False, vocab_only=True)
    tokenizer = open_run(run_dir, CPU).tokenizer
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
        assert llm.detokenize(tokenizer.encode(text)).decode() == text
    parity = check_gguf(run_dir, path, prompt="대한민국은")
    print(f"{family} {dtype}: max logit difference {parity.max_logit_difference:.2e}")
    assert parity.same_prompt_tokens
    assert parity.greedy_tokens_equal == parity.greedy_tokens > 20
    assert parity.max_logit_difference < (2e-3 if dtype == "f32" else 2e-2)
