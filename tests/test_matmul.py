"""`models.matmul.linear`: the weight-left and packed products must be F.linear's result (to float32
rounding), for every row count and layout a forward sends them, and must step aside where they do not
apply."""
import pytest
import torch
import torch.nn.functional as F

from diffspec.models import matmul
from diffspec.models.matmul import MAX_ROWS, PACKED_MAX_ROWS, Linear, kernel, linear


def weight_left(x, w):
    return kernel(x, w) == "weight_left"

needs_packed = pytest.mark.skipif(not matmul._PACKED_OK, reason="oneDNN's packed kernel is x86 only here")


@pytest.mark.parametrize("shape", [(5,), (1, 5), (2, 1, 5), (3, 2, 5), (1, MAX_ROWS, 5), (MAX_ROWS + 1, 5),
                                   (2, 8, 5), (PACKED_MAX_ROWS, 5), (PACKED_MAX_ROWS + 1, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(7, 5, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    with torch.no_grad():
        got = linear(x, w, b)
    assert got.shape == F.linear(x, w, b).shape and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_reads_a_strided_input():
    """The MLP hands the down projection a transposed (column-major) activation; it must be read as
    its values, not its storage order."""
    x = torch.randn(5, 3).t()  # (3, 5), not contiguous
    w = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_kernel_by_rows_threads_and_dtype():
    w = torch.randn(4, 5)
    threads = torch.get_num_threads()
    packed = "packed" if matmul._PACKED_OK else "f_linear"
    try:
        torch.set_num_threads(1)  # the thresholds are measured alike for one and two threads
        assert weight_left(torch.randn(MAX_ROWS, 5), w)
        assert kernel(torch.randn(MAX_ROWS + 1, 5), w) == packed
        torch.set_num_threads(2)
        assert weight_left(torch.randn(1, 5), w) and weight_left(torch.randn(1, MAX_ROWS, 5), w)
        assert weight_left(torch.randn(2, 5), w.clone().requires_grad_())  # autograd must not change the output
        assert kernel(torch.randn(MAX_ROWS + 1, 5), w) == packed
        assert kernel(torch.randn(2, PACKED_MAX_ROWS // 2, 5), w.clone().requires_grad_()) == packed
        assert kernel(torch.randn(PACKED_MAX_ROWS + 1, 5), w) == "f_linear"
        assert kernel(torch.randn(2, 5, dtype=torch.float64), w.double()) == "f_linear"
        assert kernel(torch.randn(MAX_ROWS + 1, 5, dtype=torch.float64), w.double()) == "f_linear"
        assert kernel(torch.randn(0, 5), w) == "f_linear"
    finally:
        torch.set_num_threads(threads)


@needs_packed
def test_packed_copy_follows_the_weight():
    """The reordered copy is made once per weight, reused, and remade when the weight changes in
    place (an optimizer step, load_state_dict): a stale copy would give the old weights' output."""
    lin = Linear(5, 7)
    x = torch.randn(MAX_ROWS + 3, 5)
    with torch.no_grad():
        first = lin(x)
        copy = matmul._PACKED[lin.weight][1]
        torch.testing.assert_close(lin(x), first, rtol=0, atol=0)
        assert matmul._PACKED[lin.weight][1] is copy  # reused, not reordered again
        lin.weight.mul_(2)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.load_state_dict({"weight": torch.ones(7, 5), "bias": torch.zeros(7)})
        torch.testing.assert_close(lin(x), x.sum(-1, keepdim=True).expand(-1, 7), rtol=1e-5, atol=1e-5)


@needs_packed
def test_packed_copies_stop_at_their_memory_cap(monkeypatch):
    monkeypatch.setattr(matmul, "PACKED_MAX_BYTES", 0)
    w, x = torch.randn(7, 5), torch.randn(MAX_ROWS + 3, 5)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert w not in matmul._PACKED


@pytest.mark.parametrize("rows", [1, MAX_ROWS + 3])
def test_linear_gradients_match_f_linear(rows):
    g = torch.Generator().manual_seed(1)
    w0, x0 = torch.randn(3, 5, generator=g), torch.randn(rows, 5, generator=g)
    grads = []
    for fn in (linear, F.linear):
        w, x = w0.clone().requires_grad_(), x0.clone().requires_grad_()
        fn(x, w).pow(2).sum().backward()
        grads.append((x.grad, w.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_linear_module_takes_the_weight_left_path(monkeypatch):
    """A Linear module in inference must go through the weight-left product (else the speed-up is gone)."""
    calls = []
    real = torch.mm
    monkeypatch.setattr(matmul.torch, "mm", lambda a, b: calls.append((a.shape, b.shape)) or real(a, b))
    lin = Linear(5, 3)
    with torch.inference_mode():
        lin(torch.randn(1, 5))
    assert calls == [((3, 5), (5, 2))]  # W · xᵀ, one row padded to two


def test_weight_offset_decides_the_path_and_nothing_else():
    """The BLAS rounds W · xᵀ by W's offset modulo 16 bytes. A weight at another 16-byte boundary must
    give bit-identical output; an unaligned one (a view into a safetensors file) must take F.linear
    exactly, not a weight-left product rounded some third way."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(320, 48, generator=g), torch.randn(6, 48, generator=g)
    for offset in range(1, 9):
        buf = torch.empty(w.numel() + offset)
        moved = buf[offset:].view_as(w).copy_(w)
        want = linear(x, w) if offset % 4 == 0 else F.linear(x, w)
        assert torch.equal(linear(x, moved), want), offset


def test_loaded_checkpoint_weights_are_aligned(tmp_path):
    """`_read_weights` must hand the matmuls aligned weights (else they run the slow F.linear path)."""
    from safetensors.torch import save_file

    from diffspec.models.checkpoint import _read_weights

    save_file({"a": torch.randn(3), "b": torch.randn(5, 7)}, str(tmp_path / "model.safetensors"))
    state = _read_weights(tmp_path)
    assert all(t.data_ptr() % matmul.ALIGN == 0 for t in state.values())


@pytest.mark.parametrize("how", ["weight_left", "packed", "f_linear"])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS + 3])
def test_every_kernel_computes_the_same_product(how, rows):
    """Each kernel a benchmark can force (`linear_by`) must give F.linear's product at any rows, so the
    thresholds only ever choose speed."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(rows, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(9, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(matmul.linear_by(how, x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown matmul kernel"):
        matmul.linear_by("fast", x, w)


def test_the_packed_kernel_setting_is_read_strictly():
    """DIFFSPEC_PACKED_MATMUL=0 must turn the kernel off; a value like "false" must not silently leave it on."""
    assert not matmul.packed_enabled("0")
    assert matmul.packed_enabled("1") == matmul.packed_enabled(None) == matmul.packed_enabled("")
    for bad in ("false", "off", "2"):
        with pytest.raises(ValueError, match="DIFFSPEC_PACKED_MATMUL must be 0"):
            matmul.packed_enabled(bad)


@needs_packed
def test_inference_mode_weights_take_f_linear():
    """A weight made under inference_mode has no version counter: it must not take (or crash) the
    packed path, forced or not."""
    with torch.inference_mode():
        w, x = torch.randn(7, 5), torch.randn(MAX_ROWS + 3, 5)
        assert kernel(x, w) == "f_linear"
        torch.testing.assert_close(matmul.linear_by("packed", x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
