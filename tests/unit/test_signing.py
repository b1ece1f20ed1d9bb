"""Unit tests of :mod:`daemon.signing`, the signed NOTIFY payloads, no I/O: a key derived with
:meth:`~daemon.signing.NotifyKey.derive` verifies its own signatures and never its parent's,
nor the parent its."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.signing import NotifyKey


@given(st.text(max_size=40))
def test_a_derived_key_never_verifies_the_parent_s_signatures(text: str) -> None:
    key = NotifyKey(bytes(range(32)))
    typing_key = key.derive("typing")
    assert typing_key.open(key.sign(text)) is None
    assert key.open(typing_key.sign(text)) is None
    assert typing_key.open(typing_key.sign(text)) == (text or None)
