import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.data.loader import strided_spans
from sllm.evaluate import evaluate_run, score_tokens, unigram_perplexity
from sllm.model import build_model


def _brute_force_nll(model, tokens, context_start):
    """Score each target p with an explicit context tokens[context_start(p):p], one at a time."""
    total = 0.0
    for p in range(1, len(tokens)):
        context = torch.tensor(tokens[context_start(p) : p])[None]
        logits = model(context)[0, -1]
        total -= F.log_softmax(logits.double(), dim=-1)[tokens[p]].item()
    return total


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_strided_perplexity_equals_brute_force(stride):
    torch.manual_seed(0)
    block = 16
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=block)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=75).astype(np.uint16)
    spans = list(strided_spans(len(tokens), block, stride))
    window_of = {}
    for span in spans:
        for target in range(span.end - span.scored + 1, span.end + 1):
            window_of[target] = span.begin

    with torch.no_grad():
        nll, count = score_tokens(model, tokens, stride, batch_size=4, device=torch.device("cpu"))
        expected = _brute_force_nll(model, tokens.tolist(), lambda p: window_of[p])
    assert count == len(tokens) - 1
    assert nll == pytest.approx(expected, rel=1e-5)
    if stride == 1:  # every target sees the full preceding block
        assert all(window_of[p] == max(0, p - block) for p in range(1, len(tokens)))


def test_every_target_is_scored_exactly_once():
    for n in (2, 17, 100):
        for block, stride in ((16, 16), (16, 3), (8, 1)):
            targets = []
            for span in strided_spans(n, block, stride):
                assert span.end - span.begin <= block
                targets.extend(range(span.end - span.scored + 1, span.end + 1))
            assert targets == list(range(1, n))


def test_eval_run_reports_loss_perplexity_and_bits_per_byte(trained_run, prepared_dir):
    results = {r.split: r for r in evaluate_run(trained_run, device="cpu")}
    assert set(results) == {"val", "test"}
    val = results["val"]
    assert val.perplexity == pytest.approx(math.exp(val.loss))
    import json

    meta = json.loads((prepared_dir / "meta.json").read_text())
    assert val.tokens == meta["splits"]["val"]["tokens"] - 1
    assert val.bits_per_byte == pytest.approx(
        val.loss * val.tokens / math.log(2) / meta["splits"]["val"]["bytes"]
    )
    assert val.perplexity < 512


def test_unigram_baseline_matches_hand_computation():
    train = np.array([0, 0, 1, 2])
    val = np.array([9, 0, 1])  # first token is context only
    probabilities = (np.array([2, 1, 1]) + 1) / 7
    expected = math.exp(-(math.log(probabilities[0]) + math.log(probabilities[1])) / 2)
    assert unigram_perplexity(train, val, 3) == pytest.approx(expected)
