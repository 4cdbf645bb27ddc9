"""The retrieval policy every store follows (scoring.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llamaindex_kb.scoring import (
    TINY_SCORE,
    clip,
    clip_similarities,
    fuse,
    lowest_returned,
    semantic_weight,
)


@pytest.mark.parametrize(("raw", "score"), [
    (0.42, 0.42), (1.7, 1.0), (-0.3, 0.0), (math.nan, 0.0), (None, 0.0), ("0.5", 0.5),
    ("high", 0.0), (math.inf, 1.0), (-math.inf, 0.0),
])
def test_a_score_from_outside_lands_on_the_zero_to_one_scale(raw, score):
    assert clip(raw) == score


def test_unrelated_chunks_are_never_returned_even_without_a_threshold():
    assert lowest_returned(0.0) == TINY_SCORE > 0.0
    assert lowest_returned(0.5) == 0.5


def test_negative_similarity_means_unrelated():
    clipped = clip_similarities(np.array([-0.2, 0.0, 0.3, 1.0000001]), np.float32)
    assert clipped.dtype == np.float32
    assert clipped.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0])


@pytest.mark.parametrize(("mode", "weight", "share"), [
    ("vector", 0.3, 1.0), ("keyword", 0.3, 0.0), ("hybrid", 0.3, 0.3)])
def test_the_mode_decides_the_semantic_share(mode, weight, share):
    assert semantic_weight(mode, weight) == share


def test_fusing_float32_columns_matches_exact_arithmetic_to_float32_rounding():
    rng = np.random.default_rng(7)
    semantic, keyword = rng.random(1000), rng.random(1000)
    exact = 0.7 * semantic + (1.0 - 0.7) * keyword  # the weights as every store derives them
    fused32 = fuse(semantic.astype(np.float32), keyword.astype(np.float32), 0.7)
    assert fused32.dtype == np.float32
    np.testing.assert_allclose(fused32, exact, rtol=2e-7, atol=1e-7)
    np.testing.assert_array_equal(fuse(semantic, keyword, 0.7), exact)
