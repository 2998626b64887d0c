import copy
import warnings

import pytest
import torch

from sllm.config import ModelConfig
from sllm.errors import UserError
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.infer.decoder import Decoder
from sllm.infer.engine import TextGenerator, TextRow, TokenStream
from sllm.model import build_model
from sllm.sampling import SamplingParams

CPU = torch.device("cpu")


def _model(block_size=32):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    ).eval()


def _argmax_by_full_forward(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def _rows(stream):
    rows = [[] for _ in stream.rows]
    for step in stream:
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows


def test_greedy_batch_of_unequal_prompts_equals_each_prompt_decoded_alone():
    model = _model()
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9], [2, 7, 1, 8], [1, 4, 1, 4, 2, 1]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    generated = _rows(TokenStream(model, prompts, params, eos_id=None, device=CPU))
    assert generated == [_argmax_by_full_forward(model, prompt, 12) for prompt in prompts]


def test_column_major_weights_give_the_same_logits_and_greedy_tokens():
    model = _model()
    plain = copy.deepcopy(model)
    use_column_major_weights(model)
    assert model.blocks[0].attn.qkv.weight.t().is_contiguous() and model.wte.weight.t().is_contiguous()
    assert model.blocks[0].mlp.proj.weight.is_contiguous()  # narrowing: left row-major
    idx = torch.tensor([[3, 14, 15, 9, 2, 6], [2, 7, 1, 8, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx))
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert _rows(TokenStream(model, prompts, params, None, CPU)) == _rows(
        TokenStream(plain, prompts, params, None, CPU)
    )


def test_a_batch_decodes_past_the_context_by_refilling_the_cache():
    model = _model(block_size=16)
    prompts = [[5, 6], [3, 14, 15, 9, 2, 6, 5, 3, 5]]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    generated = _rows(TokenStream(model, prompts, params, eos_id=None, device=CPU))
    assert [len(tokens) for tokens in generated] == [30, 30]
    assert generated[1][:7] == _argmax_by_full_forward(model, prompts[1], 7)  # before the first refill


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed_shapes"])
def test_a_full_cache_refills_with_each_rows_newest_three_quarters(fixed_shapes):
    model = _model(block_size=8)
    rows = [[3, 14, 15, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8]]
    with torch.inference_mode():
        decoder = Decoder(model, 2, CPU, fixed_shapes=fixed_shapes)
        decoder.prefill(rows)
        tokens = torch.tensor([5, 9])
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.append(token)
        refilled = decoder.step(tokens, rows)
        expected = model(torch.tensor([row[-6:] for row in rows]))[:, -1]
    torch.testing.assert_close(refilled, expected, atol=1e-5, rtol=1e-5)
    assert decoder.length == 6


def test_each_row_stops_at_its_own_eos():
    model = _model()
    prompts = [[3, 14, 15], [2, 7, 1, 8, 2, 8]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    free = [_argmax_by_full_forward(model, prompt, 12) for prompt in prompts]
    eos = free[0][2]
    stream = TokenStream(model, prompts, params, eos_id=eos, device=CPU)
    generated = _rows(stream)
    for row, tokens in enumerate(free):
        expected = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert generated[row] == expected
        assert stream.finish_reasons[row] == ("stop" if eos in tokens else "length")


def test_seeded_batch_sampling_reproduces():
    model = _model()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, min_p=0.05, seed=3)
    prompts = [[1, 2, 3], [4]]
    first = _rows(TokenStream(model, prompts, params, None, CPU))
    assert first == _rows(TokenStream(model, prompts, params, None, CPU))
    assert first != _rows(
        TokenStream(model, prompts, SamplingParams(**{**params.__dict__, "seed": 4}), None, CPU)
    )


class _PieceTokenizer:
    """Token i is the string pieces[i]."""

    eos_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_stop_string_split_across_tokens_cuts_before_it_and_is_never_streamed():
    tokenizer = _PieceTokenizer(["", "Hello", " wor", "ld", " E", "ND", " more"])
    row = TextRow(tokenizer, stop=("END", "xyz"))
    pieces = [row.add(token) for token in (1, 2, 3, 4)]
    assert pieces == ["Hello", " wor", "ld", " "]  # "E" is held back: it may begin "END"
    assert not row.stopped
    assert row.add(5) == "" and row.stopped
    assert row.text == "Hello world "
    assert row.finish() == ""


def test_held_back_text_is_released_when_no_stop_follows():
    tokenizer = _PieceTokenizer(["", "a E", "N", "x", "E"])
    row = TextRow(tokenizer, stop=("END",))
    assert [row.add(token) for token in (1, 2, 3, 4)] == ["a ", "", "ENx", ""]
    assert row.finish() == "E" and row.text == "a ENxE"


@pytest.fixture(scope="module")
def generator(trained_run):
    return TextGenerator.from_run(trained_run, device="cpu")


def _stop_string_across_two_tokens(generator) -> tuple[str, str, str]:
    """A prompt, a stop string spanning two tokens of its greedy continuation, and the text
    before it; tries prompts until the continuation has two adjacent whole-character tokens."""
    for prompt in ("대한민국은", "국민의 권리와 의무", "제1조", "국회는", "대통령은"):
        ids = generator.tokenizer.encode(prompt)
        new = _argmax_by_full_forward(generator.model, ids, 16)
        if generator.tokenizer.eos_id in new:
            new = new[: new.index(generator.tokenizer.eos_id)]
        pieces = [generator.tokenizer.decode([token]) for token in new]
        whole = [bool(piece) and "\ufffd" not in piece for piece in pieces]
        boundary = next((i for i in range(1, len(new) - 1) if whole[i] and whole[i + 1]), None)
        if boundary is not None:
            stop = pieces[boundary][-1] + pieces[boundary + 1][0]
            full = generator.tokenizer.decode(new)
            return prompt, stop, full[: full.index(stop)]
    raise AssertionError("no prompt gave two adjacent whole-character tokens")


def test_stop_string_on_a_trained_run_cuts_at_its_first_occurrence(generator):
    prompt, stop, expected = _stop_string_across_two_tokens(generator)
    params = {"max_new_tokens": 16, "temperature": 0, "stop": [stop]}
    assert generator.generate(prompt, **params) == expected
    assert "".join(generator.stream(prompt, **params)) == expected
    [completion] = generator.complete([prompt], SamplingParams(**params))
    assert completion.finish_reason == "stop"


def test_streaming_yields_the_non_streamed_text_for_a_batch(generator):
    prompts = ["대한민국은", "국민의 권리와 의무", "제1조"]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, seed=5, stop=("다.",))
    streamed = ["", "", ""]
    for row, piece in generator.stream_batch(prompts, params):
        streamed[row] += piece
    assert streamed == [c.text for c in generator.complete(prompts, params)]
    assert streamed == generator.generate(prompts, **params.__dict__)
    assert any(streamed)


def test_over_long_prompt_is_a_user_error_in_strict_mode(generator):
    with pytest.raises(UserError, match="more than the context"):
        generator.encode_prompt("국민의 권리와 의무 " * 40, strict=True)


def test_text_generator_is_importable_from_the_package():
    import sllm

    assert sllm.TextGenerator is TextGenerator


def _gqa_rope_model(block_size=16):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=block_size, pos="rope"
    )
    return build_model(cfg).eval()


@pytest.mark.parametrize("make_model", [_model, _gqa_rope_model])
def test_static_decode_steps_equal_plain_steps_through_a_refill(make_model):
    model = make_model(block_size=16)
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    plain = _rows(TokenStream(model, prompts, params, None, CPU, cuda_graph=False))
    static = _rows(TokenStream(model, prompts, params, None, CPU, cuda_graph=True))
    assert static == plain
    assert [len(tokens) for tokens in static] == [30, 30, 30]


def test_static_step_logits_equal_the_plain_step_for_a_padded_batch():
    model = _gqa_rope_model(block_size=32)
    follow = torch.tensor([[4, 1, 7], [9, 2, 7], [11, 3, 7]])
    static, plain = _static_and_plain_logits(model, [[5, 6], [3, 14, 15, 9, 2, 6, 5], [2, 7, 1]], follow)
    torch.testing.assert_close(static, plain, atol=1e-5, rtol=1e-5)


def _static_and_plain_logits(model, prompts, follow, amp_dtype=None, device=CPU, compile_step=False):
    """Logits of the prefill and of each forced step, through fixed-shape and through eager steps."""
    logits = {}
    with torch.inference_mode():
        for static in (False, True):
            decoder = Decoder(
                model,
                len(prompts),
                device,
                amp_dtype,
                fixed_shapes=static,
                compile_step=static and compile_step,
            )
            rows = [list(p) for p in prompts]
            steps = [decoder.prefill(rows)]
            for tokens in follow:
                for row, token in zip(rows, tokens.tolist(), strict=True):
                    row.append(token)
                steps.append(decoder.step(tokens, rows))
            logits[static] = torch.stack(steps).float()
            if static and device.type == "cuda":
                assert decoder.graph is not None and not decoder.failed
    return logits[True], logits[False]


def test_static_steps_with_a_one_token_context_refill_every_step():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=2)).eval()
    static, plain = _static_and_plain_logits(model, [[5], [7]], torch.randint(0, 40, (8, 2)))
    torch.testing.assert_close(static, plain, atol=1e-5, rtol=1e-5)


def test_static_steps_store_bf16_keys_from_fp32_qk_norm_under_autocast():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32, qk_norm=True, norm="rmsnorm"
    )
    model = build_model(cfg).eval()
    follow = torch.randint(0, 40, (4, 2))
    static, plain = _static_and_plain_logits(model, [[3, 14, 15], [2, 7]], follow, torch.bfloat16)
    torch.testing.assert_close(static, plain, atol=2e-2, rtol=2e-2)


def test_a_failed_graph_capture_warns_once_and_decodes_eagerly():
    model = _model()
    prompts = [[3, 14, 15], [2, 7]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    with torch.inference_mode():
        decoder = Decoder(model, 2, CPU, fixed_shapes=True)
        decoder.as_graph = True  # as on CUDA; capturing on the CPU fails
        logits = decoder.prefill(prompts)
        tokens = []
        with pytest.warns(UserWarning, match="CUDA graph capture failed") as caught:
            for _ in range(4):
                token = logits.argmax(dim=-1)
                tokens.append(token.tolist())
                logits = decoder.step(token, prompts)
    assert len(caught) == 1 and decoder.failed
    plain = _rows(TokenStream(model, prompts, params, None, CPU, cuda_graph=False))
    assert [[step[row] for step in tokens] for row in range(2)] == [row[:4] for row in plain]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_plain_steps_on_cuda_through_a_refill(dtype):
    cuda = torch.device("cuda")
    model = _gqa_rope_model(block_size=16).to(cuda, dtype)
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]
    follow = torch.randint(0, 40, (30, 3), device=cuda)  # 30 steps: the 16-token cache refills
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fell back, or an empty graph, fails the test
        static, plain = _static_and_plain_logits(model, prompts, follow, torch.bfloat16, cuda)
    torch.testing.assert_close(static, plain, atol=5e-2, rtol=5e-2)  # bf16 autocast on both


def test_interleaved_streams_on_one_model_each_decode_their_own_prompts():
    model = _model()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    first, second = [[5], [3, 14, 15, 9]], [[2, 7, 1, 8, 2], [6]]  # same batch size, other padding
    expected = [_rows(TokenStream(model, p, params, None, CPU, cuda_graph=False)) for p in (first, second)]
    running = iter(TokenStream(model, first, params, None, CPU, cuda_graph=True))
    started = [next(running)]
    assert _rows(TokenStream(model, second, params, None, CPU, cuda_graph=True)) == expected[1]
    rest = started + list(running)
    assert [[step[row] for step in rest] for row in range(2)] == expected[0]


def test_a_stream_caches_what_it_needs_not_the_whole_context(monkeypatch):
    model = _model(block_size=512)
    params = SamplingParams(max_new_tokens=130, temperature=0)
    prompts = [[5, 6, 7], [3]]
    plain = _rows(TokenStream(model, prompts, params, None, CPU, cuda_graph=False))
    slots = []

    class Recorded(Decoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            slots.append(self.cache.slots)

    monkeypatch.setattr("sllm.infer.engine.Decoder", Recorded)
    assert _rows(TokenStream(model, prompts, params, None, CPU, cuda_graph=True)) == plain
    next(iter(TokenStream(model, prompts, SamplingParams(max_new_tokens=600), None, CPU)))
    assert slots == [192, 512]  # 3 + 130 tokens, in steps of 64; then the whole context


@pytest.mark.slow
def test_a_compiled_step_compiles_once_for_every_stream_and_equals_the_eager_step():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _gqa_rope_model(block_size=64)
    follow = torch.tensor([[4, 1], [9, 2], [11, 3], [7, 7]])
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5]]
    compiled, eager = _static_and_plain_logits(model, prompts, follow, compile_step=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    other = [[7, 8], [2]]  # a second stream of the same shapes (a server's next request)
    compiled, eager = _static_and_plain_logits(model, other, follow, compile_step=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompile per position or stream


def test_compiling_the_decode_step_needs_cuda(trained_run):
    with pytest.raises(UserError, match="needs CUDA"):
        TextGenerator.from_run(trained_run, "cpu", compile_step=True)


def test_a_model_wrapped_as_fsdp_wraps_it_decodes_the_same_tokens():
    model = _model()
    wrapped = copy.deepcopy(model)
    wrapped.__class__ = type("ShardedGPT", (type(model),), {})  # as FSDP's fully_shard does
    prompts, params = [[5], [3, 14, 15, 9]], SamplingParams(max_new_tokens=12, temperature=0)
    assert _rows(TokenStream(wrapped, prompts, params, None, CPU)) == _rows(
        TokenStream(model, prompts, params, None, CPU)
    )


def test_banned_ids_are_never_sampled(trained_run):
    model = _model()
    prompts, params = [[5], [3, 14, 15, 9]], SamplingParams(max_new_tokens=12, temperature=0)
    free = _rows(TokenStream(model, prompts, params, None, CPU))
    favourite = max(set(free[0] + free[1]), key=(free[0] + free[1]).count)
    banned = _rows(TokenStream(model, prompts, params, None, CPU, banned_ids=(favourite,)))
    assert favourite not in banned[0] + banned[1]
    hot = SamplingParams(max_new_tokens=12, temperature=5.0, seed=0)
    sampled = _rows(TokenStream(model, prompts * 8, hot, None, CPU, banned_ids=(favourite,)))
    assert all(favourite not in row for row in sampled)
    tokenizer = TextGenerator.from_run(trained_run, device="cpu").tokenizer
    assert tokenizer.pad_id != tokenizer.eos_id and tokenizer.never_generated == (tokenizer.pad_id,)
