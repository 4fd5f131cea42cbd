"""Dropout masks from the compiled kernel: the bits and generator state of ``bernoulli_``."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraq.native import bernoulli


def _twister_reference(state: torch.Tensor, n: int, p: float) -> np.ndarray:
    """PyTorch's serial CPU ``bernoulli_(p)`` written out with numpy's own MT19937: two 32-bit
    words per element, ``u = (hi << 32 | lo) & (2^53 - 1)) * 2^-53``, kept when ``u < p``."""
    raw = state.numpy()
    left = int(raw[8:12].view(np.int32)[0])
    words = raw[24 : 24 + 624 * 8].view(np.uint64).astype(np.uint32)
    twister = np.random.MT19937()
    twister.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 625 - left}}
    pairs = twister.random_raw(2 * n).astype(np.uint64)
    wide = (pairs[0::2] << np.uint64(32)) | pairs[1::2]
    u = (wide & np.uint64(2**53 - 1)).astype(np.float64) * 2.0**-53
    return (u < p).astype(np.uint8)


@pytest.fixture
def kernel():
    if bernoulli._library() is None:
        pytest.skip("no C compiler: the kernel cannot be built")


@pytest.mark.parametrize("n", [1, 311, 312, 624, 625, 1249, 20_001])
@pytest.mark.parametrize("p", [0.95, 0.5, 1 / 3, 0.0, 1.0])
def test_kernel_follows_the_twister(kernel, n, p):
    generator = torch.Generator().manual_seed(n)
    torch.rand(n % 13, generator=generator)  # start mid-way through a 624-word refill
    expected = _twister_reference(generator.get_state(), n, p)
    got = bernoulli._kernel_mask(n, p, generator)
    assert np.array_equal(got.numpy(), expected)
    # the generator moved on by exactly 2n words: the next draw continues the same stream
    after = torch.randint(0, 2**31, (4,), generator=generator)
    replay = torch.Generator().manual_seed(n)
    torch.rand(n % 13, generator=replay)
    torch.empty(n, dtype=torch.uint8).bernoulli_(0.5, generator=replay)
    assert torch.equal(after, torch.randint(0, 2**31, (4,), generator=replay))


def test_kernel_is_trusted_on_this_machine_when_torch_draws_serially(kernel):
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    serial = np.array_equal(
        torch.empty(3000, dtype=torch.uint8).bernoulli_(0.9, generator=generator).numpy(),
        _twister_reference(state, 3000, 0.9),
    )
    assert bernoulli.exact_kernel_available() == serial


@pytest.mark.parametrize("shape", [(5,), (32, 64, 384), (3, 1000)])
def test_mask_and_generator_equal_bernoulli(shape):
    torch.manual_seed(11)
    state = torch.get_rng_state()
    expected = torch.empty(shape, dtype=torch.uint8).bernoulli_(0.95)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    got = bernoulli.bernoulli_mask(torch.empty(shape), 0.95)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "small"])
def test_dropout_equals_f_dropout_values_and_gradients(layout):
    x = torch.randn(16, 64, 300)
    x = {"contiguous": x, "transposed": x.transpose(0, 2), "small": x[:1, :2]}[layout]
    x.requires_grad_(True)
    torch.manual_seed(3)
    ref = F.dropout(x, 0.1, training=True)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    torch.manual_seed(3)
    got = bernoulli.dropout(x, 0.1)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(got, ref) and torch.equal(got_grad, ref_grad)


def test_a_kernel_that_disagrees_is_never_used(monkeypatch):
    def wrong(n, p, generator):
        generator.get_state()
        return torch.zeros(n, dtype=torch.uint8)

    monkeypatch.setattr(bernoulli, "_kernel_mask", wrong)
    bernoulli.exact_kernel_available.cache_clear()
    try:
        assert not bernoulli.exact_kernel_available()
        torch.manual_seed(5)
        got = bernoulli.bernoulli_mask(torch.empty(100, 100), 0.9)
        torch.manual_seed(5)
        assert torch.equal(got, torch.empty(100, 100, dtype=torch.uint8).bernoulli_(0.9))
    finally:
        bernoulli.exact_kernel_available.cache_clear()


def test_mode_off_uses_bernoulli_itself(monkeypatch):
    monkeypatch.setenv("LORAQ_KERNELS", "off")
    bernoulli._library.cache_clear()
    bernoulli.exact_kernel_available.cache_clear()
    try:
        assert bernoulli._library() is None and not bernoulli.exact_kernel_available()
        torch.manual_seed(2)
        got = bernoulli.dropout(torch.ones(64, 64), 0.5)
        torch.manual_seed(2)
        assert torch.equal(got, F.dropout(torch.ones(64, 64), 0.5, training=True))
    finally:
        monkeypatch.delenv("LORAQ_KERNELS")
        bernoulli._library.cache_clear()
        bernoulli.exact_kernel_available.cache_clear()


def test_gradient_checkpointing_replays_the_same_masks():
    from torch.utils.checkpoint import checkpoint

    from loraq.layers.fused import lora_linear

    w, a, b = torch.randn(48, 40), torch.randn(8, 40), torch.randn(48, 8)
    x = torch.randn(64, 40, requires_grad=True)

    def layer(inp):
        return lora_linear(inp, a, b, 0.5, weight=w, dropout_p=0.2)

    torch.manual_seed(9)
    (plain,) = torch.autograd.grad(layer(x).sin().sum(), x)
    torch.manual_seed(9)
    (replayed,) = torch.autograd.grad(checkpoint(layer, x, use_reentrant=False).sin().sum(), x)
    assert torch.equal(plain, replayed)


def test_fake_and_batched_tensors_keep_pytorchs_draw():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = bernoulli.dropout(torch.empty(64, 64), 0.1)
    assert fake.shape == (64, 64)
    batched = torch.func.vmap(lambda row: bernoulli.dropout(row, 0.1), randomness="different")
    assert batched(torch.ones(4, 4096)).shape == (4, 4096)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096, 10_007])
def test_pack_and_unpack_round_trip_in_numpys_bit_order(kernel, n):
    mask = (torch.rand(n) < 0.7).to(torch.uint8)
    bits = bernoulli.pack_mask(mask)
    assert bits is not None and bits.numel() == -(-n // 8)
    assert np.array_equal(bits.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(bernoulli.unpack_mask(bits, mask.shape), mask)
    with pytest.raises(ValueError, match="cannot hold a mask of shape"):
        bernoulli.unpack_mask(bits, torch.Size([n + 8]))


def test_fused_lora_keeps_its_mask_at_one_bit_per_element(kernel):
    from loraq.layers.fused import lora_linear

    if not (bernoulli.exact_kernel_available() and bernoulli.packing_available()):
        pytest.skip("PyTorch's own draw is used here")
    w, a = torch.randn(48, 40), torch.randn(8, 40, requires_grad=True)
    b = torch.randn(48, 8, requires_grad=True)
    x = torch.randn(256, 40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, a, b, 0.5, weight=w, dropout_p=0.1)
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert [m.numel() for m in masks] == [x.numel() // 8]


def test_an_explicit_generator_is_followed_and_a_foreign_one_refused():
    like = torch.empty(64, 64)
    mine, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = bernoulli.bernoulli_mask(like, 0.8, generator=mine)
    expected = torch.empty(64, 64, dtype=torch.uint8).bernoulli_(0.8, generator=reference)
    assert torch.equal(got, expected)
    assert torch.equal(mine.get_state(), reference.get_state())
    # A generator of another device is never read as a CPU twister: PyTorch itself answers
    # (here with its TypeError for a non-Generator; the kernel would have asked for get_state).
    foreign = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(TypeError):
        bernoulli.bernoulli_mask(like, 0.8, generator=foreign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_keep_mask_draws_bernoulli_and_apply_keep_zeroes_the_dropped(dtype):
    x = torch.randn(300, 77, dtype=dtype)
    torch.manual_seed(12)
    keep, packed = bernoulli.keep_mask(x, 0.25)
    after = torch.get_rng_state()
    torch.manual_seed(12)
    mask = torch.empty(x.shape, dtype=torch.uint8).bernoulli_(0.75)
    assert torch.equal(torch.get_rng_state(), after)
    assert packed == bernoulli.packing_available()
    unpacked = bernoulli.unpack_mask(keep, x.shape) if packed else keep
    assert torch.equal(unpacked, mask)
    assert torch.equal(bernoulli.apply_keep(x, keep, packed), x * mask)
    inplace = x.clone()
    assert bernoulli.apply_keep(inplace, keep, packed, inplace=True) is inplace
    assert torch.equal(inplace, x * mask)


def test_apply_keep_refuses_bits_of_another_size(kernel):
    bits = bernoulli.pack_mask(torch.ones(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not cover a tensor of 72"):
        bernoulli.apply_keep(torch.ones(72), bits, True)
