"""Architecture options of the GPT decoder: RoPE, RMSNorm, SwiGLU/ReLU², qk-norm, GQA, untied head,
vocabulary padding, activation checkpointing and the chunked loss."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from sllm.config import ModelConfig, load_config
from sllm.errors import UserError
from sllm.infer.decoder import Decoder, KVCache
from sllm.infer.engine import TokenStream
from sllm.model import build_model, count_parameters
from sllm.sampling import SamplingParams

from .conftest import tiny_config

VOCAB = 61
OPTIONS = {
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2"},
    "qk_norm": {"qk_norm": True},
    "gqa": {"n_kv_head": 2},
    "untied": {"tie_embeddings": False},
    "padded_vocab": {"vocab_pad_multiple": 16},
    "llama": {
        "pos": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "n_kv_head": 1,
        "bias": False,
        "qk_norm": True,
        "tie_embeddings": False,
    },
}


def _model(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=24, **overrides)
    return build_model(cfg).eval()


@pytest.mark.parametrize("name", OPTIONS)
def test_changing_a_token_leaves_earlier_logits_unchanged(name):
    model = _model(**OPTIONS[name])
    idx = torch.randint(0, VOCAB, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert before.shape == (2, 20, VOCAB)
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


DECODE_OPTIONS = {"default": {}, "sinusoidal": {"pos": "sinusoidal"}, "no_bias": {"bias": False}, **OPTIONS}


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed_shapes"])
@pytest.mark.parametrize("name", DECODE_OPTIONS)
def test_kv_cache_decoding_equals_full_forward(name, fixed_shapes):
    model = _model(**DECODE_OPTIONS[name])
    idx = torch.randint(0, VOCAB, (3, 24))
    with torch.inference_mode():
        full = model(idx)
        decoder = Decoder(model, 3, torch.device("cpu"), fixed_shapes=fixed_shapes)
        rows = idx[:, :7].tolist()
        steps = [decoder.prefill(rows)] + [decoder.step(idx[:, t], rows) for t in range(7, 24)]
    assert (torch.stack(steps, dim=1) - full[:, 6:]).abs().max() <= 1e-5


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed_shapes"])
@pytest.mark.parametrize("name", ["default", "rope", "gqa", "llama"])
def test_left_padded_batch_in_the_cache_equals_each_prompt_alone(name, fixed_shapes):
    model = _model(**DECODE_OPTIONS[name])
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 9, 6)]
    follow = torch.randint(0, VOCAB, (3, 4))
    with torch.inference_mode():
        decoder = Decoder(model, 3, torch.device("cpu"), fixed_shapes=fixed_shapes)
        padded = [decoder.prefill(prompts)] + [decoder.step(follow[:, t], prompts) for t in range(4)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([torch.tensor(prompt), follow[row]])[None])[0, len(prompt) - 1 :]
            got = torch.stack([step[row] for step in padded])
            assert (got - alone).abs().max() <= 1e-5


def test_gqa_cache_holds_only_the_key_value_heads():
    model = _model(n_kv_head=2)
    cache = KVCache(model.cfg, 3, 24, torch.device("cpu"), torch.float32)
    assert cache.keys.shape == (2, 3, 2, 24, 8)


def _decode_step_overhead(monkeypatch, **overrides) -> tuple[list[str], Counter]:
    """The `Module.__getattr__` lookups and the module calls (by class) of one decode step."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB, n_head=4, n_embd=32, block_size=24, **overrides)).eval()
    decoder = Decoder(model, 2, torch.device("cpu"))
    lookups, calls = [], Counter()
    with torch.inference_mode():
        decoder.prefill([[5, 6, 7], [3]])
        lookup = nn.Module.__getattr__
        monkeypatch.setattr(nn.Module, "__getattr__", lambda m, name: lookups.append(name) or lookup(m, name))
        hook = register_module_forward_pre_hook(lambda module, args: calls.update([type(module).__name__]))
        try:
            decoder.step(torch.tensor([4, 5]), [[5, 6, 7, 4], [3, 5]])
        finally:
            hook.remove()
            monkeypatch.undo()
    return lookups, calls


@pytest.mark.parametrize("name", ["default", "llama_without_qk_norm"])
def test_a_decode_step_costs_one_module_call_and_no_attribute_fallback_per_block(name, monkeypatch):
    """On a CPU the module machinery would be a third of a small model's decode step (`gpt.linear`):
    a block's parts and weights are read from `_modules` and `_parameters`, and only the
    block itself is called as a module."""
    options = {"llama_without_qk_norm": {**OPTIONS["llama"], "qk_norm": False}}.get(name, {})
    two_lookups, two_calls = _decode_step_overhead(monkeypatch, n_layer=2, **options)
    four_lookups, four_calls = _decode_step_overhead(monkeypatch, n_layer=4, **options)
    assert four_lookups == two_lookups and len(two_lookups) <= 8
    assert four_calls - two_calls == Counter(Block=2) and two_calls["Block"] == 2


@pytest.mark.parametrize("name", ["rope", "gqa", "llama"])
def test_greedy_batch_of_left_padded_prompts_equals_each_prompt_decoded_alone(name):
    model = _model(**OPTIONS[name])
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    stream = TokenStream(model, prompts, params, eos_id=None, device=torch.device("cpu"))
    generated = [[] for _ in prompts]
    for step in stream:
        for row, token in enumerate(step):
            if token is not None:
                generated[row].append(token)
    for prompt, tokens in zip(prompts, generated, strict=True):
        ids = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]


@pytest.mark.parametrize("name", ["rope", "llama"])
def test_packed_document_computes_what_it_computes_alone(name):
    model = _model(**OPTIONS[name])
    first, second = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 11))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 9 + [1] * 11])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)
        alone = model(second)
    assert (together[:, 9:] - alone).abs().max() <= 1e-5


def test_gqa_and_swiglu_parameter_counts_match_formula():
    width, heads, kv_heads, layers = 32, 4, 2, 2
    hidden = 64 * math.ceil(8 * width / 3 / 64)  # 128 for width 32
    model = _model(n_kv_head=kv_heads, mlp="swiglu", norm="rmsnorm", bias=False, pos="rope")
    head_dim = width // heads
    attention = width * (width + 2 * kv_heads * head_dim) + width * width
    per_block = attention + 3 * width * hidden + 2 * width
    assert hidden == 128
    assert count_parameters(model) == VOCAB * width + layers * per_block + width
    untied = _model(tie_embeddings=False, vocab_pad_multiple=16)
    assert count_parameters(untied) - count_parameters(_model()) == 64 * width + (64 - VOCAB) * width


def test_padded_vocabulary_is_never_predicted():
    model = _model(vocab_pad_multiple=16)
    assert model.wte.weight.shape[0] == 64
    with torch.no_grad():
        model.wte.weight[VOCAB:] = 100.0  # padded rows that would win every argmax
        logits = model(torch.randint(0, VOCAB, (2, 10)))
    assert logits.shape[-1] == VOCAB


def _loss_and_grads(model, idx, targets, chunked):
    model.zero_grad()
    loss = (
        model(idx, targets=targets)
        if chunked
        else F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["rope", "llama", "padded_vocab"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    model = _model(**OPTIONS[name]).train()
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    loss, grads = _loss_and_grads(model, idx, targets, chunked=False)
    model.checkpoint_blocks = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, idx, targets, chunked=False)
    assert abs(loss - loss_ckpt) <= 1e-6
    assert max((grads[n] - grads_ckpt[n]).abs().max() for n in grads) <= 1e-6


@pytest.mark.parametrize("name", ["untied", "padded_vocab", "llama"])
def test_chunked_loss_through_the_model_equals_the_plain_loss(name):
    model = _model(**OPTIONS[name]).train()
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    loss, grads = _loss_and_grads(model, idx, targets, chunked=False)
    loss_chunked, grads_chunked = _loss_and_grads(model, idx, targets, chunked=True)
    assert abs(loss - loss_chunked) <= 1e-5
    assert max((grads[n] - grads_chunked[n]).abs().max() for n in grads) <= 1e-5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_kv_head=3", "model.n_kv_head"),
        ("model.pos=alibi", "allowed values: learned, sinusoidal, rope"),
        ("model.norm=batchnorm", "allowed values: layernorm, rmsnorm"),
        ("model.mlp=geglu", "allowed values: gelu, swiglu, relu2"),
        ("model.vocab_pad_multiple=0", "model.vocab_pad_multiple"),
        ("model.mlp_hidden=-1", "model.mlp_hidden"),
    ],
)
def test_bad_architecture_options_are_user_errors_naming_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["model.n_head=4", "model.n_embd=32", override])


def test_rope_with_odd_head_width_is_a_user_error():
    with pytest.raises(UserError, match="model.pos: rope"):
        load_config(None, ["model.n_head=4", "model.n_embd=36", "model.pos=rope"])


@pytest.mark.parametrize(
    ("preset", "vocab", "millions"),
    [
        ("gpt2-124m", 50257, 124.5),
        ("ko-85m", 32000, 80.2),
        ("ko-350m", 32000, 336.1),
        ("llama-style-small", 32000, 100.1),
    ],
)
def test_presets_load_and_have_the_documented_size(preset, vocab, millions):
    cfg = load_config(preset)
    cfg.model.vocab_size = vocab
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert round(count_parameters(model) / 1e6, 1) == millions


def test_llama_style_preset_learns_with_checkpointing_and_chunked_loss(prepared_dir, tmp_path):
    from sllm.train.trainer import train

    shape = [
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.n_embd=64",
        "model.block_size=32",
    ]
    cfg = load_config("llama-style-small", shape)
    cfg.data, cfg.train, cfg.log, cfg.sample = _tiny_sections(prepared_dir, tmp_path / "run")
    train(cfg, log=lambda _: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] - 1.0
    assert losses[-1] < math.log(512) - 1.5


def _tiny_sections(data_dir, run_dir):
    options = ["train.chunked_loss=true", "train.activation_checkpointing=true", "train.max_steps=60"]
    tiny = tiny_config(data_dir, run_dir, *options)
    return tiny.data, tiny.train, tiny.log, tiny.sample


def test_checkpoints_from_before_the_options_still_match_the_default_model():
    from dataclasses import asdict

    from sllm.train.resume import config_differences

    old_keys = ("arch", "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pos", "vocab_size")
    wanted = asdict(ModelConfig(vocab_size=VOCAB))
    assert config_differences({k: wanted[k] for k in old_keys}, wanted) == []
    assert config_differences({k: wanted[k] for k in old_keys}, wanted | {"pos": "rope"}) == [
        "pos: 'learned' → 'rope'"
    ]


def test_new_special_tokens_fill_padding_rows_and_grow_an_untied_head():
    from sllm.infer.chat_template import grow_embeddings

    padded = _model(vocab_pad_multiple=16)
    grow_embeddings(padded, VOCAB + 2)
    assert padded.wte.weight.shape[0] == 64 and padded(torch.tensor([[VOCAB + 1]])).shape[-1] == VOCAB + 2
    untied = _model(tie_embeddings=False)
    grow_embeddings(untied, VOCAB + 2)
    assert untied.lm_head.weight.shape[0] == untied.wte.weight.shape[0] == VOCAB + 2
    assert untied(torch.tensor([[VOCAB + 1]])).shape[-1] == VOCAB + 2
