"""Every BVLC layer case recorded by real Caffe replays: forward, params, backward."""
import pytest

from golden import cases, replay


@pytest.mark.parametrize("case", cases("layers"))
def test_layer_case(case: str) -> None:
    replay("layers", case)
