import ctypes
import sys

import pytest
import torch

from sllm.runtime import keep_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="needs glibc ≥ 2.33")
def test_large_tensors_come_from_the_heap_not_fresh_mappings():
    libc = _glibc()
    keep_freed_memory()
    mapped_before = libc.mallinfo2().hblkhd
    logits_sized = torch.empty(64 * 2**20, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd == mapped_before  # a fresh mmap would add its 64 MiB here
    del logits_sized
