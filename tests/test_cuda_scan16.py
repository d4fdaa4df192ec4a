"""The GPU selective scan with 16-bit activations (cuda/scan.cu, ADT != 0): u, delta, z and y
as bfloat16 (uint16 bits, the package's convention) or IEEE float16, A, B, C, D, the bias and
the states float32. Skipped where no GPU is visible.

Reference: the float64 scan (blackmamba.ref) on the 16-bit inputs widened exactly to float64.
The kernel widens them exactly too and runs the float32 math of the float32 scan, so the only
differences are that math's error (TOL_SCAN of test_cuda_ops, relative to the output's scale)
and the final rounding of y to 16 bits: at most half an ulp, 2^-8 |y| for bf16 (8 significant
bits), 2^-11 |y| for fp16 (11). Each element is held to that bound plus the float32 slack.
"""
import numpy as np
import pytest

from blackmamba import cuda, ops, ref

pytestmark = pytest.mark.gpu

if not cuda.is_available():
    pytest.skip("no CUDA GPU visible (or blackmamba built without CUDA)", allow_module_level=True)

from test_cuda_ops import TOL_SCAN, native, rng_for, scan_inputs  # noqa: E402

D = cuda.to_device
HALF_ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def to16(x, dt):
    """float32 -> (16-bit array for the GPU, its exact float32 value)."""
    if dt == "bfloat16":
        bits = ref.f32_to_bf16(x)
        return bits, ref.bf16_to_f32(bits)
    h = x.astype(np.float16)
    return h, h.astype(np.float32)


def from16(a, dt):
    return ref.bf16_to_f32(a) if dt == "bfloat16" else a.astype(np.float32)


def inputs(rng, b, L, E, N, opts, dt):
    """test_cuda_ops.scan_inputs's draws with u, delta and z rounded to dt: (the 16-bit
    arguments for the GPU, the same with their exact float32 values)."""
    kw = scan_inputs(rng, b, L, E, N, opts)
    u, delta, z = kw["u"], kw["delta"], kw["z"]
    (u16, uw), (d16, dw) = to16(u, dt), to16(delta, dt)
    z16, zw = to16(z, dt) if z is not None else (None, None)
    dev = dict(kw, u=u16, delta=d16, z=z16)
    wide = dict(dev, u=uw, delta=dw, z=zw)
    return dev, wide


def check_y(y16, dt, yr):
    """y16 (the GPU's 16-bit y) against the float64 reference: half an ulp of the output
    dtype per element plus the float32 scan's slack (TOL_SCAN x the output's rms)."""
    y = from16(y16, dt).astype(np.float64)
    slack = TOL_SCAN * max(float(np.sqrt(np.mean(yr ** 2))), 1e-30)
    bound = HALF_ULP[dt] * np.abs(yr) * (1 + 1e-6) + slack
    err = np.abs(y - yr)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"y[{np.unravel_index(worst, yr.shape)}] = {y.flat[worst]!r}, "
                                  f"reference {yr.flat[worst]!r}, bound {bound.flat[worst]:.3g}")


# Shapes: E % 4 == 0 (8-byte copies) and not (E = 7, 33, 130: element copies, the scalar y
# path, a partial block); L not a multiple of the 16-step chunk; N = 4 (the auto rule's TPC 1
# raised to 2: the packed kernel needs it), 16 (TPC 2), 40 and 64 (TPC 4); b = 1, which the
# float32 scan runs sequence-parallel and the 16-bit one in one pass.
SHAPES = [(1, 1, 4, 1), (2, 33, 7, 16), (3, 70, 130, 5), (2, 50, 64, 16), (1, 300, 96, 16),
          (2, 17, 36, 40), (1, 40, 33, 64), (4, 129, 128, 4)]


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
@pytest.mark.parametrize("b,L,E,N", SHAPES)
@pytest.mark.parametrize("opts", ["all", "bare", "no_softplus"])
def test_scan_16bit_activations(dt, b, L, E, N, opts):
    dev, wide = inputs(rng_for("scan16", dt, b, L, E, N, opts), b, L, E, N, opts, dt)
    yr, finr = ref.selective_scan(**wide)
    before = native().bm_cuda_scan_packed_calls()
    y, fin = ops.selective_scan(**{k: (D(v) if isinstance(v, np.ndarray) else v)
                                   for k, v in dev.items()})
    assert native().bm_cuda_scan_packed_calls() == before + 1
    yh = y.numpy()
    assert yh.dtype == dev["u"].dtype and yh.shape == (b, L, E)
    assert fin.numpy().dtype == np.float32 and fin.shape == (b, E, N)
    check_y(yh, dt, yr)
    # the state is float32 math on the same (widened) values as the float32 scan's
    err = np.linalg.norm(fin.numpy() - finr) / max(np.linalg.norm(finr), 1e-30)
    assert err < TOL_SCAN, err
    # the float32 GPU scan on the widened inputs: the same y up to the final rounding
    y32, fin32 = ops.selective_scan(**{k: (D(v) if isinstance(v, np.ndarray) else v)
                                       for k, v in wide.items()})
    # the float32 GPU scan on the widened inputs: y16 is its round-to-nearest-even to 16 bits,
    # bit for bit, except where the two float32 results (the same VAR 3 arithmetic, or at b = 1
    # the segmented float32 path) differ by an ulp across a rounding boundary: rare
    y32 = y32.numpy()
    same = (to16(y32, dt)[0].view(np.uint16) == yh.view(np.uint16)) | (np.isnan(y32) & np.isnan(from16(yh, dt)))
    assert same.mean() >= (0.99 if y32.size >= 100 else 0.9), same.mean()


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_scan_16bit_chunked_prefill(dt):
    # a prompt in two pieces with the state carried between them == one piece (the initial
    # state in and the final state out, which the issue asks of the kernel)
    b, L, E, N = 2, 75, 64, 16
    dev, wide = inputs(rng_for("scan16chunk", dt), b, L, E, N, "all", dt)
    g = lambda d: {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in d.items()}  # noqa: E731
    y_all, fin_all = ops.selective_scan(**g(dev))
    cut = 37
    head = dict(dev, u=dev["u"][:, :cut], delta=dev["delta"][:, :cut], z=dev["z"][:, :cut],
                B=dev["B"][:, :cut], C=dev["C"][:, :cut])
    tail = dict(dev, u=dev["u"][:, cut:], delta=dev["delta"][:, cut:], z=dev["z"][:, cut:],
                B=dev["B"][:, cut:], C=dev["C"][:, cut:])
    y1, st = ops.selective_scan(**g(head))
    tail["state"] = st.numpy()
    y2, fin = ops.selective_scan(**g(tail))
    yr, finr = ref.selective_scan(**wide)
    check_y(np.concatenate([y1.numpy(), y2.numpy()], axis=1), dt, yr)
    err = np.linalg.norm(fin.numpy() - fin_all.numpy()) / np.linalg.norm(fin_all.numpy())
    assert err < 1e-5, err


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_scan_16bit_empty_sequence(dt):
    b, E, N = 2, 8, 4
    dev, _ = inputs(rng_for("scan16empty", dt), b, 0, E, N, "all", dt)
    y, fin = ops.selective_scan(**{k: (D(v) if isinstance(v, np.ndarray) else v)
                                   for k, v in dev.items()})
    assert y.shape == (b, 0, E) and y.numpy().dtype == dev["u"].dtype
    np.testing.assert_array_equal(fin.numpy(), dev["state"])


def test_scan_16bit_nonfinite_propagates():
    # a NaN in u reaches y (NaN in, NaN out), an inf in z too; no crash, no silent zero
    dev, _ = inputs(rng_for("scan16nan"), 1, 20, 8, 4, "all", "float16")
    dev["u"][0, 5, 3] = np.float16(np.nan)
    y, fin = ops.selective_scan(**{k: (D(v) if isinstance(v, np.ndarray) else v)
                                   for k, v in dev.items()})
    yh = y.numpy().astype(np.float32)
    assert np.isnan(yh[0, 5:, 3]).all()        # the channel's state is NaN from step 5 on
    assert np.isfinite(yh[0, :5]).all() and np.isfinite(np.delete(yh[0], 3, axis=1)).all()
    assert np.isnan(fin.numpy()[0, 3]).all()


def test_scan_16bit_dtype_errors():
    dev, _ = inputs(rng_for("scan16err"), 1, 8, 8, 4, "all", "bfloat16")
    g = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in dev.items()}
    with pytest.raises(TypeError, match="delta must be uint16"):
        ops.selective_scan(**dict(g, delta=D(ref.bf16_to_f32(dev["delta"]))))
    with pytest.raises(TypeError, match="z must be uint16"):
        ops.selective_scan(**dict(g, z=D(from16(dev["z"], "bfloat16").astype(np.float16))))
    with pytest.raises(TypeError, match="u must be float32, float16 or uint16"):
        ops.selective_scan(**dict(g, u=D(dev["u"].astype(np.int16))))
    with pytest.raises(TypeError, match="A must be float32"):
        ops.selective_scan(**dict(g, A=D(dev["A"].astype(np.float16))))
    # the CPU op takes float32 activations only
    with pytest.raises(TypeError, match="u must be float32"):
        ops.selective_scan(**dict(dev, u=dev["u"].view(np.uint16)))


def test_scan_16bit_torch_interop():
    torch = pytest.importorskip("torch")
    rng = rng_for("scan16torch")
    b, L, E, N = 2, 40, 64, 16
    for tdt, dt in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        f = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).cuda()  # noqa: E731
        u, delta, z = (f(b, L, E).to(tdt) for _ in range(3))
        A = -torch.exp(0.5 * f(E, N))
        B, C, Dv, db = f(b, L, N), f(b, L, N), f(E), f(E)
        y, fin = ops.selective_scan(u, delta, A, B, C, Dv, z, db, True)
        widen = lambda t: t.float().cpu().numpy()  # noqa: E731
        yr, finr = ref.selective_scan(widen(u), widen(delta), A.cpu().numpy(), B.cpu().numpy(),
                                      C.cpu().numpy(), Dv.cpu().numpy(), widen(z),
                                      db.cpu().numpy(), True, None)
        check_y(y.numpy(), dt, yr)
        back = torch.from_dlpack(y)   # out without a copy
        assert back.data_ptr() == y.ptr
