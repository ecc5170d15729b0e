"""Layout: ranks, groups, round-robin layers, positions, prefill mapping, set matching, impossible shapes."""

from __future__ import annotations

import pytest

from odmoe.errors import OdmoeError
from odmoe.runtime.layout import Layout, eq1_budget, resolve

MIXTRAL = dict(top_k=2, num_experts=8, moe_layers=list(range(32)))


def test_paper_layout_matches_section_3_2():
    lay = Layout.build(8, **MIXTRAL)
    assert lay.world_size == 10 and lay.num_groups == 4 and lay.slots == 1
    assert [lay.group(layer) for layer in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert lay.group_workers(0) == [0, 1] and lay.group_workers(3) == [6, 7]
    assert lay.served_layers(0) == list(range(0, 32, 4))  # each worker serves L / NG = 8 layers
    assert lay.positions(1, 4) == [1] and lay.positions(2, 4) == []
    assert [lay.prefill_worker(e) for e in range(8)] == list(range(8))  # worker i takes expert i
    assert Layout.name(0) == "main (rank 0)" and Layout.name(1) == "shadow (rank 1)"
    assert Layout.name(5) == "worker 3 (rank 5)"


def test_top4_with_groups_of_two_needs_two_slots():
    with pytest.raises(OdmoeError, match="slots"):
        Layout.build(4, 4, 8, [0, 1, 2], group_size=2, slots=1)
    lay = Layout.build(4, 4, 8, [0, 1, 2], group_size=2)
    assert lay.slots == 2 and lay.positions(0, 0) == [0, 2] and lay.positions(1, 0) == [1, 3]
    assert lay.position_worker(1, 3) == 3


def test_fewer_workers_than_experts_share_prefill_experts():
    lay = Layout.build(2, 2, 8, [0, 1, 2, 3])
    assert lay.num_groups == 1 and lay.prefill_experts(1) == [1, 3, 5, 7]
    host = lay.host_experts(0)
    assert (3, 7) in host and len(host) == 4 * 8  # one group serves every layer: all experts


def test_more_workers_than_experts_leave_prefill_workers_idle():
    lay = Layout.build(12, 2, 8, [0, 1])
    assert lay.prefill_experts(9) == [] and lay.num_groups == 6


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(num_workers=5), "groups of 2"),
        (dict(num_workers=0), "at least one worker"),
        (dict(num_workers=4, group_size=3), "idle"),
        (dict(num_workers=4, group_size=0), ">= 1"),
    ],
)
def test_impossible_layouts_raise_clear_errors(args, match):
    with pytest.raises(OdmoeError, match=match):
        Layout.build(**{**MIXTRAL, **args})


def test_set_matching_keeps_hits_and_fills_misses_in_router_order():
    assert resolve([3, 5], [5, 3]) == [3, 5]  # right pair, other slots: no reload
    assert resolve([3, 6], [5, 3]) == [3, 5]  # one miss: the wrong slot takes the missing expert
    assert resolve([1, 2], [5, 3]) == [5, 3]
    assert resolve(None, [5, 3]) == [5, 3]


def test_eq1_uses_the_number_of_groups():
    assert eq1_budget(1.0, 2.0, 4) == 4 * 1.0 + 3 * 2.0
