"""verify_token and the time claims of a correctly signed token: whatever a time claim holds,
the token is accepted only when every time claim is a finite number of seconds up to
9999-12-31 (and exp is later than now, nbf and iat not later); anything else is an AuthError,
never another exception and never a token accepted because PyJWT read the value with int()."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.auth import LATEST_TIME, AuthError, verify_token

SECRET = "s" * 40
SUB = "01JD3V6Z7W2Q4X8Y9A0B1C2D3E"

# JSON values a token's author can put in a claim, NaN and infinities included (PyJWT's JSON
# reader takes NaN and Infinity)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["9999999999", "0", "1e300"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                               max_size=2),
    max_leaves=4)


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256",
                      json_encoder=json.JSONEncoder)  # allow_nan: NaN, Infinity as JSON


def is_date(value: object) -> bool:
    return (type(value) in (int, float) and value == value  # not NaN
            and abs(value) != float("inf") and value <= LATEST_TIME)  # type: ignore[operator]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@given(value=json_values)
def test_a_time_claim_that_is_no_date_is_refused(claim: str, value: object) -> None:
    now = time.time()
    claims = {"sub": SUB, "exp": now + 3600, claim: value}
    try:
        verified = verify_token(SECRET, signed(claims))
    except AuthError:
        return
    assert is_date(value), f"{claim}={value!r} accepted"
    if claim == "exp":
        assert verified.exp == float(value) > now  # type: ignore[arg-type]
    else:
        assert value <= now + 1  # type: ignore[operator]


@pytest.mark.parametrize("value", ["9999999999", 1e300, 10**30])
def test_times_pyjwt_alone_accepts_are_refused(value: object) -> None:
    """What PyJWT, reading exp with int(), takes for a date far in the future."""
    with pytest.raises(AuthError, match="exp must be a number"):
        verify_token(SECRET, signed({"sub": SUB, "exp": value}))
