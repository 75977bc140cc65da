"""runtime/uva.py: small host->GPU transfers read by a kernel from pinned memory (CUDA only),
and the plain ``Tensor.to`` everywhere else."""

from __future__ import annotations

import pytest
import torch

from ollm.runtime import uva

CUDA = torch.cuda.is_available()


def test_cpu_targets_take_tensor_to() -> None:
    t = torch.randn(3, 4)
    assert uva.to_device(t, "cpu") is t
    assert uva.to_device(t, torch.device("cpu"), non_blocking=True) is t


def test_off_a_non_blocking_transfer_goes_through_pinned_memory(monkeypatch) -> None:
    """``OLLM_UVA=0``: a small tensor asked not to block is pinned first (from pageable memory
    the copy would wait for the GPU), a blocking one is copied as it is."""
    monkeypatch.setenv("OLLM_UVA", "0")
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: ("copied", a, k))
    cuda = torch.device("cuda", 0)
    t = torch.arange(4)
    assert uva.to_device(t, cuda, non_blocking=True) == ("copied", (cuda,), {"non_blocking": True})
    assert len(pinned) == 1
    assert uva.to_device(t, cuda) == ("copied", (cuda,), {"non_blocking": False})
    assert len(pinned) == 1


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_bit_exact_through_the_ring(dtype: torch.dtype) -> None:
    """More transfers than ring slots, some non-contiguous and of odd byte counts, each source
    overwritten right after: every result is bit-equal to its source."""
    kept = []
    for i in range(3 * uva.RING):
        src = (torch.randn(5 + i, 7 + (i % 3)) * 100).to(dtype)
        src = src.t() if i % 2 else src  # a transposed view
        want = src.clone()
        got = uva.to_device(src, "cuda")
        src.zero_()  # the staging copy was taken at the call
        kept.append((want, got))
    torch.cuda.synchronize()
    for want, got in kept:
        assert got.device.type == "cuda" and got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.cpu().view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_large_and_disabled_take_the_copy_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.ones(uva.MAX_BYTES // 4 + 1)
    assert torch.equal(uva.to_device(big, "cuda").cpu(), big)
    monkeypatch.setenv("OLLM_UVA", "0")
    assert not uva.enabled()
    t = torch.arange(10.0)
    assert torch.equal(uva.to_device(t, "cuda").cpu(), t)
