"""Unit tests of :mod:`daemon.signing`, the signed NOTIFY payloads, no I/O: a key derived with
:meth:`~daemon.signing.NotifyKey.derive` verifies its own signatures and never its parent's,
nor the parent its; :class:`~daemon.signing.RejectBudget` bounds the checks of forgeries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.signing import NotifyKey, RejectBudget


@given(st.text(max_size=40))
def test_a_derived_key_never_verifies_the_parent_s_signatures(text: str) -> None:
    key = NotifyKey(bytes(range(32)))
    typing_key = key.derive("typing")
    assert typing_key.open(key.sign(text)) is None
    assert key.open(typing_key.sign(text)) is None
    assert typing_key.open(typing_key.sign(text)) == (text or None)


def test_a_reject_budget_sheds_the_rest_of_its_window_once_spent() -> None:
    """A flood of forgeries (attack 5 of issue 25): past ``limit`` rejections in a window, the
    rest of it is shed; the next window checks again."""
    budget = RejectBudget(limit=3, window=1.0)
    assert not budget.shedding(10.0)
    assert [budget.rejected(10.0 + i / 10) for i in range(3)] == [False, False, True]
    assert budget.until == 11.0
    assert budget.shedding(10.5) and budget.shedding(10.99)
    assert not budget.shedding(11.0)
    assert [budget.rejected(11.0), budget.rejected(11.5)] == [False, False]  # a new window
    assert not budget.shedding(11.6)


def test_a_trickle_of_rejections_never_sheds() -> None:
    budget = RejectBudget(limit=3, window=1.0)
    assert not any(budget.rejected(t / 2) for t in range(100))  # two a second, limit three
    assert not budget.shedding(50.0)


def test_a_reject_budget_needs_a_positive_limit_and_window() -> None:
    with pytest.raises(ValueError):
        RejectBudget(limit=0)
    with pytest.raises(ValueError):
        RejectBudget(window=0)
