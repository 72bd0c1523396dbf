"""One device and dtype choice: what every command computes on, and in."""

import pytest
import torch

from nanoseek.device import all_reduce, any_rank, choose_compute, from_rank0


def test_compute_defaults_and_overrides(monkeypatch):
    default = choose_compute()
    if torch.cuda.is_available():
        assert default.device == "cuda" and default.dtype == torch.bfloat16
    else:
        assert default.device == "cpu" and default.dtype == torch.float32
    cpu = choose_compute("cpu")
    assert cpu.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with cpu.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with choose_compute("cpu", "bfloat16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert choose_compute("cpu", "auto") == choose_compute("cpu", None) == choose_compute("cpu", "float32")


def test_bad_devices_and_dtypes_are_clear_errors():
    with pytest.raises(ValueError, match="dtype must be auto, bfloat16 or float32, not 'half'"):
        choose_compute("cpu", "half")
    with pytest.raises(RuntimeError):
        choose_compute("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            choose_compute("cuda")


def test_collectives_without_ranks_are_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce(t) is t and any_rank(True) and not any_rank(False) and from_rank0(True)
