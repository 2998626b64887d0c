import ctypes
import sys

import pytest
import torch

from sllm.runtime import cpu_bf16_hint, keep_freed_memory


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


def test_bf16_hint_only_for_fp32_cpu_runs_on_cpus_with_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    ten_million = 10_000_000
    assert "train.dtype=bf16" in cpu_bf16_hint(cpu, None, ten_million)
    assert cpu_bf16_hint(cpu, None, 1_000_000) is None  # the demo's size: bf16 gains little there
    assert cpu_bf16_hint(cpu, torch.bfloat16, ten_million) is None
    assert cpu_bf16_hint(torch.device("cuda"), None, ten_million) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cpu_bf16_hint(cpu, None, ten_million) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16_hint(cpu, None, ten_million) is not None
