"""The compiled CPU dequantize kernel against the pure-PyTorch reference, bit for bit."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from loraq.native import dequant as cpu
from loraq.native import pages
from loraq.quant import dequantize_4bit, dequantize_8bit, quantize_4bit, quantize_8bit

needs_kernel = pytest.mark.skipif(
    cpu.mode() == "off" or not cpu.available(), reason="compiled kernel off or unbuildable here"
)


def _pure(monkeypatch, fn, *args):
    """``fn(*args)`` with the compiled kernel switched off (the reference path)."""
    with monkeypatch.context() as m:
        m.setattr(cpu, "_library", lambda: None)
        return fn(*args)


@needs_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(96, 200), (3, 1001), (70001,), (1, 37)])
def test_4bit_kernel_equals_reference(monkeypatch, quant_type, double_quant, blocksize, shape):
    t = torch.randn(shape) * 0.05
    q = quantize_4bit(t, blocksize, quant_type, double_quant)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_4bit(q, dtype)
        want = _pure(monkeypatch, dequantize_4bit, q, dtype)
        assert got.dtype == want.dtype and torch.equal(got, want), (dtype, shape)


@needs_kernel
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
@pytest.mark.parametrize("shape", [(128, 300), (5, 999)])
def test_8bit_kernel_equals_reference(monkeypatch, blocksize, shape):
    q = quantize_8bit(torch.randn(shape), blocksize)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_8bit(q, dtype)
        assert torch.equal(got, _pure(monkeypatch, dequantize_8bit, q, dtype)), dtype


@needs_kernel
def test_kernel_is_used_and_multithreaded_slices_agree(monkeypatch):
    calls = []
    real = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(cpu, "_PARALLEL_MIN", 1 << 16)  # slices across threads at this size
    q = quantize_4bit(torch.randn(512, 1024), 64, "nf4", True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = dequantize_4bit(q, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert calls == [512 * 1024]  # one pass: the double-quant scales are decoded on the fly
    assert torch.equal(got, _pure(monkeypatch, dequantize_4bit, q, torch.float32))


def test_float16_and_foreign_layouts_use_the_pure_path(monkeypatch):
    q = quantize_4bit(torch.randn(64, 64), 64, "nf4", False)
    assert torch.equal(dequantize_4bit(q, torch.float16), dequantize_4bit(q).half())
    out = torch.empty(64 * 64 * 2)[::2]  # not contiguous: the kernel declines
    absmax = q.block_absmax()
    assert not cpu.dequantize_4bit_into(q.packed, absmax, q.code, 64, 64 * 64, out)


def test_mode_off_and_unbuildable_fall_back(monkeypatch, tmp_path):
    from loraq.core.errors import UserError
    from loraq.native import build

    monkeypatch.setenv(cpu.MODE_ENV, "off")
    cpu._library.cache_clear()
    try:
        assert cpu.mode() == "off" and not cpu.available()
        monkeypatch.setenv(cpu.MODE_ENV, "auto")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setenv("PATH", str(tmp_path))  # no compiler anywhere
        cpu._library.cache_clear()
        with pytest.warns(RuntimeWarning, match="compiled dequantize unavailable"):
            assert not cpu.available()
        q = quantize_4bit(torch.randn(32, 32), 32, "nf4", False)
        assert dequantize_4bit(q).shape == (32, 32)  # the pure path still answers
        monkeypatch.setenv(cpu.MODE_ENV, "on")
        cpu._library.cache_clear()
        with pytest.raises(build.KernelUnavailableError, match="LORAQ_KERNELS=on but"):
            cpu.available()
        assert issubclass(build.KernelUnavailableError, UserError)  # one line in the CLI
    finally:
        cpu._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_cached_kernel_is_rebuilt(damage, tmp_path):
    import subprocess

    from loraq.native import build

    env = {**os.environ, "LORAQ_CACHE_DIR": str(tmp_path), "LORAQ_KERNELS": "on"}
    # the name dequant.py will look for (the default cache: this only learns the name)
    cached = build.build(cpu._SOURCE, build._compiler(), openmp=build.shares_torch_openmp())
    target = tmp_path / cached.name
    good = cached.read_bytes()
    target.write_bytes(
        {"garbage": b"not a shared library", "truncated": good[:5000], "empty": b""}[damage]
    )
    # A truncated library whose ELF header survived kills the process that maps it (SIGBUS):
    # load in a child, so a regression fails this test instead of the whole run.
    probe = "from loraq.native import dequant; assert dequant.available()"
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert target.read_bytes()[:4] == b"\x7fELF" and len(target.read_bytes()) > 5000


def test_unknown_kernel_mode_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(cpu.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"LORAQ_KERNELS='sometimes'.*auto.*off.*on"):
        cpu.mode()
    cpu._library.cache_clear()
    try:
        with pytest.raises(ValueError, match="LORAQ_KERNELS"):
            cpu.available()
    finally:
        cpu._library.cache_clear()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    flags: list[str] = []
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux's")
def test_large_dense_results_are_advised_onto_huge_pages():
    big = pages.empty_for_write(3 << 20, torch.float32, "cpu")  # 12 MiB
    interior = -(-big.data_ptr() // (2 << 20)) * (2 << 20)
    assert "hg" in _vm_flags(interior)
    small = pages.empty_for_write(1000, torch.float32, "cpu")
    assert small.shape == (1000,) and small.dtype == torch.float32
    # the dequantized result is written in full, whatever memory it lands on
    t = torch.randn(4096, 1024) * 0.05
    q = quantize_4bit(t, 64, "nf4", True)
    assert torch.equal(
        dequantize_4bit(q, torch.float32),
        q.dequantize_range(0, t.numel(), torch.empty(t.numel())).view(t.shape),
    )


def _omp_runtimes() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_openmp_build_shares_torchs_runtime_and_plain_build_agrees(monkeypatch):
    """With PyTorch's libgomp loaded, the kernel is built with OpenMP and runs on that same
    runtime (no second one is mapped); without, the build has no OpenMP. Both give the bits of
    the pure path, on one thread and on several."""
    from loraq.native import build

    q = quantize_4bit(torch.randn(1024, 700), 64, "nf4", True)
    q8 = quantize_8bit(torch.randn(1024, 700), 256)
    expected = _pure(monkeypatch, dequantize_4bit, q, torch.float32)
    expected8 = _pure(monkeypatch, dequantize_8bit, q8, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        for shares in (build.shares_torch_openmp(), False):
            monkeypatch.setattr(cpu, "shares_torch_openmp", lambda s=shares: s)
            cpu._library.cache_clear()
            assert bool(cpu._library().loraq_openmp()) == shares
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.equal(dequantize_4bit(q, torch.float32), expected)
                assert torch.equal(dequantize_8bit(q8, torch.bfloat16), expected8)
            if shares:
                assert len(_omp_runtimes()) == 1
    finally:
        torch.set_num_threads(before)
        cpu._library.cache_clear()
