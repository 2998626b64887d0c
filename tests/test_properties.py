"""Property-based checks of the window arithmetic the loaders rely on."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sllm.data.loader import TrainWindows, strided_spans


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 400), st.integers(1, 64), st.data())
def test_strided_spans_score_every_target_once(n_tokens, block_size, data):
    stride = data.draw(st.integers(1, block_size))
    targets = []
    previous_begin = -1
    for span in strided_spans(n_tokens, block_size, stride):
        assert 0 <= span.begin < span.end <= n_tokens - 1
        assert span.end - span.begin <= block_size
        assert 1 <= span.scored <= span.end - span.begin
        assert span.begin > previous_begin
        previous_begin = span.begin
        targets.extend(range(span.end - span.scored + 1, span.end + 1))
    assert targets == list(range(1, n_tokens))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 300), st.integers(1, 32), st.integers(1, 8), st.integers(0, 10**6), st.integers(0, 10**4)
)
def test_train_windows_are_in_bounds_and_a_pure_function(n_extra, block_size, batch, seed, step):
    tokens = np.arange(block_size + n_extra, dtype=np.uint16)
    windows = TrainWindows(tokens, block_size, batch, seed)
    x, y = windows.batch(step, 1)
    assert x.shape == y.shape == (batch, block_size)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one
    assert (y - x == 1).all()  # contiguous windows of the arange
    assert int(y.max()) < len(tokens)
    again_x, _ = TrainWindows(tokens, block_size, batch, seed).batch(step, 1)
    assert (x == again_x).all()
