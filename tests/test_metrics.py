"""Recall (PAPER.md §7, Eq. 2 and Eq. 3) against a hand-computed example."""

import numpy as np
import pandas as pd
import pytest

from odmoe.metrics import hits, ratio, recall_overall, recall_per_layer, recall_per_token

# Two prompts, three output tokens, two layers, top-2. Prompt 2 stopped after two tokens, so its
# third row is garbage that A(q, n) must mask out.
TRUE = np.array(
    [
        [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 7], [1, 6]]],
        [[[3, 4], [5, 6]], [[1, 2], [0, 3]], [[0, 1], [0, 1]]],
    ]
)
PRED = np.array(
    [
        [[[1, 0], [2, 4]], [[0, 1], [7, 6]], [[7, 3], [6, 2]]],  # c: (2, 1), (0, 2), (1, 1)
        [[[4, 3], [6, 5]], [[0, 3], [1, 3]], [[0, 1], [0, 1]]],  # c: (2, 2), (0, 1), masked
    ]
)
C = np.array([[[2, 1], [0, 2], [1, 1]], [[2, 2], [0, 1], [2, 2]]])
A = np.array([[1, 1, 1], [1, 1, 0]])


def test_hits_is_set_intersection_with_partial_credit():
    assert hits(PRED, TRUE).tolist() == C.tolist()
    assert hits(np.array([2, 5]), np.array([5, 2])) == 2  # order does not matter
    assert hits(np.array([-1, 5]), np.array([-1, 2])) == 0  # padding never matches


def test_eq2_per_token_by_hand():
    # n=1: (2+1+2+2)/(2*2*2) = 7/8; n=2: (0+2+0+1)/8 = 3/8; n=3: only prompt 1: (1+1)/(2*2*1) = 1/2
    assert np.allclose(recall_per_token(C, k=2, exists=A), [7 / 8, 3 / 8, 1 / 2])


def test_eq3_is_micro_average_not_mean_of_eq2():
    # (3 + 2 + 2 + 4 + 1) / (2 * 2 * 5 existing pairs) = 12 / 20
    assert recall_overall(C, k=2, exists=A) == pytest.approx(0.6)
    assert np.mean(recall_per_token(C, k=2, exists=A)) == pytest.approx(7 / 12)  # a different number


def test_per_layer_by_hand():
    # layer 0: (2+0+1+2+0)/(2*5) = 0.5; layer 1: (1+2+1+2+1)/10 = 0.7
    assert np.allclose(recall_per_layer(C, k=2, exists=A), [0.5, 0.7])


def test_all_tokens_exist_by_default_and_unreached_n_is_nan():
    assert recall_overall(C, k=2) == pytest.approx(16 / 24)  # the masked row counts now
    assert np.isnan(recall_per_token(C, k=2, exists=np.array([[1, 1, 0], [1, 1, 0]]))[2])


def test_ratio_of_stored_rows_reproduces_eq2_and_eq3():
    rows = [
        {"q": q, "n": n + 1, "hits": int(C[q, n].sum()), "slots": 2 * 2}
        for q in range(2)
        for n in range(3)
        if A[q, n]
    ]
    frame = pd.DataFrame(rows)
    assert ratio(frame) == pytest.approx(recall_overall(C, k=2, exists=A))
    assert np.allclose(ratio(frame, by="n").to_numpy(), recall_per_token(C, k=2, exists=A))
