"""util/pinned: host tensors locked page by page with cudaHostRegister, unlocked with their last view.

CUDA's registration calls are replaced by a recorder here, so the allocation, the alignment and the
lifetime run on any machine; tests/test_gpu.py runs the real calls on a GPU.
"""

import gc
import mmap

import pytest
import torch

from kvpress_aqua.util import pinned


class FakeCudart:
    def __init__(self, fail: int = 0) -> None:
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.fail = fail

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        if not self.fail:
            self.registered[address] = size
        return self.fail

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802
        self.unregistered.append(address)
        return 0


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    return fake


def test_the_locked_range_is_the_tensor_itself_page_aligned_and_exact(cudart):
    t = pinned.pinned_zeros((3, 2, 1000, 5), torch.bfloat16)
    assert t.shape == (3, 2, 1000, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert torch.count_nonzero(t) == 0
    assert cudart.registered == {t.data_ptr(): t.nbytes}  # no rounding up to a power of two
    assert t.data_ptr() % mmap.PAGESIZE == 0


def test_pages_stay_locked_while_any_view_lives_and_are_unlocked_after(cudart):
    t = pinned.pinned_zeros((4, 64), torch.float32)
    address = t.data_ptr()
    view = t[2:]
    del t
    gc.collect()
    assert cudart.unregistered == []
    view += 1  # the memory is still there
    del view
    gc.collect()
    assert cudart.unregistered == [address]


def test_a_copy_holds_the_values_and_an_empty_shape_locks_nothing(cudart):
    src = torch.arange(24, dtype=torch.float16).view(2, 3, 4)
    out = pinned.pinned_copy(src[:, 1:])
    assert torch.equal(out, src[:, 1:]) and out.is_contiguous()
    empty = pinned.pinned_zeros((2, 3, 0, 8), torch.float32)
    assert empty.shape == (2, 3, 0, 8) and list(cudart.registered) == [out.data_ptr()]


def test_a_refused_registration_says_what_to_do(monkeypatch):
    monkeypatch.setattr(pinned, "_cudart", lambda: FakeCudart(fail=2))
    with pytest.raises(RuntimeError, match="cudaHostRegister failed with CUDA error 2.*lower the batch"):
        pinned.pinned_zeros((8, 8), torch.float32)
