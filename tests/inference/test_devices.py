import pytest

from nlpstream.inference.devices import parse_devices
from nlpstream.inference.errors import DeviceError


def test_forms():
    assert parse_devices("auto", cuda_count=0) == ["cpu"]
    assert parse_devices("auto", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu:2", cuda_count=0) == ["cpu", "cpu"]
    assert parse_devices("cuda:0,cuda:1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "cpu:x", "cuda:5", "cuda"])
def test_invalid(spec):
    with pytest.raises(DeviceError):
        parse_devices(spec, cuda_count=1 if spec == "cuda:5" else 0)
