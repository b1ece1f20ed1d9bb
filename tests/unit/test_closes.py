"""The close codes are defined once (daemon/closes.py) and documented as defined."""

import re
from pathlib import Path

from daemon.closes import Close
from daemon.metrics import CLOSE_CODES, Metrics

PROTOCOL = Path(__file__).parents[2] / "docs" / "PROTOCOL.md"


def documented_codes() -> set[int]:
    """The codes of PROTOCOL.md's "Close codes" table."""
    section = PROTOCOL.read_text().split("## Close codes", 1)[1].split("\n## ", 1)[0]
    return {int(code) for code in re.findall(r"^\| (\d{4}) \|", section, re.M)}


def test_protocol_md_documents_every_code_the_bridge_sends_and_no_other() -> None:
    # 1000 is the client's own normal close; the bridge never starts one
    assert documented_codes() - {1000} == {int(code) for code in Close}


def test_the_metric_counts_every_code_from_the_start_and_explains_each() -> None:
    metrics = Metrics()
    assert CLOSE_CODES == tuple(str(int(code)) for code in Close)
    text = metrics.render().decode()
    for code in Close:
        assert f'pgbridge_closes_total{{code="{int(code)}"}} 0.0' in text
        assert f"{int(code)} {code.meaning}" in text


def test_members_are_the_codes_themselves() -> None:
    # sent as they are: a member is the int on the wire, and its str is the number
    assert Close.TOO_SLOW == 4008 and str(Close.TOO_SLOW) == "4008"
    assert Close.POLICY == 1008 and Close(1013) is Close.OVERLOADED
