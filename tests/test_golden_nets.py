"""Whole real-world nets recorded by real Caffe replay blob for blob."""
import pytest

from golden import cases, replay


@pytest.mark.parametrize("case", cases("nets"))
def test_net_case(case: str) -> None:
    replay("nets", case)
