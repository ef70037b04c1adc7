"""The native ai.sparsify::SparseConv kernel equals ONNX Conv on the masked dense weight.

Needs the built library (pip install -e . builds it). Without it these tests fail, unless
SPARSIFY_ALLOW_NO_NATIVE=1 says that a pure-Python install is intended (then they skip).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native_models import PRE_OPS, SUM_OPS, ConvCase, dense_model, packed_feeds, random_case, sparse_model, split_input
from sparsify.errors import RuntimeBackendError
from sparsify.runtime import native
from sparsify.runtime.bench import vector_aligned


@pytest.fixture(scope="module", autouse=True)
def _require_native() -> None:
    status = native.info()
    if status["loadable"]:
        return
    if os.environ.get("SPARSIFY_ALLOW_NO_NATIVE") == "1":
        pytest.skip(f"native kernel not available (allowed by SPARSIFY_ALLOW_NO_NATIVE=1): {status['reason']}")
    pytest.fail(f"native SparseConv kernel not loadable: {status['reason']} "
                "(build it with `pip install -e .`, or set SPARSIFY_ALLOW_NO_NATIVE=1)")


def run_both(case: ConvCase, x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(native SparseConv output, ORT dense Conv output) for input x."""
    sparse = native.session(sparse_model(case), threads).run(None, {"X": x})[0]
    dense = native.session(dense_model(case), threads, native=False).run(None, {"X": x})[0]
    return sparse, dense


OPS = ("SparseConv", "SparseConvRelu", "SparseConvClip", "SparseConvAdd", "SparseConvAddRelu", "SparseConvPre",
       "SparseConvPreRelu")
CLIP = (-0.5, 2.0)  # the bounds the tests give SparseConvClip


def pre_params(cin: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel scale and shift for the pre ops: mixed signs, so Relu zeroes a real share."""
    rng = np.random.default_rng(cin)
    return rng.uniform(-1.5, 1.5, cin).astype(np.float32), rng.uniform(-0.5, 0.5, cin).astype(np.float32)


def run_op(case: ConvCase, x: np.ndarray, op: str, threads: int, z: np.ndarray | None = None) -> np.ndarray:
    """The native op's output (SparseConvClip with bounds CLIP; the sum ops add z; the pre ops
    take pre_params)."""
    attrs = dict(min=CLIP[0], max=CLIP[1]) if op == "SparseConvClip" else {}
    feeds = {"X": x, **({"Z": z} if op in SUM_OPS else {})}
    pre = pre_params(case.cin) if op in PRE_OPS else None
    return native.session(sparse_model(case, op_type=op, pre=pre, **attrs), threads).run(None, feeds)[0]


def reference(case: ConvCase, x: np.ndarray, op: str, z: np.ndarray | None = None) -> np.ndarray:
    """What `op` computes, from ORT's own dense Conv: the pre-activation of x for the pre ops, + z
    for the sum ops, then the activation."""
    if op in PRE_OPS:
        s, t = pre_params(case.cin)
        x = np.maximum(x * s[None, :, None, None] + t[None, :, None, None], 0).astype(np.float32)
    y = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    if op in SUM_OPS:
        y = y + z
    if op in ("SparseConvRelu", "SparseConvAddRelu", "SparseConvPreRelu"):
        y = np.maximum(y, 0)
    if op == "SparseConvClip":
        y = np.clip(y, *CLIP)
    return y


def assert_plain_sum_and_pre_ops(case: ConvCase, x: np.ndarray, rng: np.random.Generator) -> None:
    """SparseConv, SparseConvAddRelu (a random Z) and SparseConvPreRelu equal their references on
    1 and 2 threads."""
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = rng.standard_normal(conv.shape).astype(np.float32)
    for threads in (1, 2):
        for op in ("SparseConv", "SparseConvAddRelu", "SparseConvPreRelu"):
            assert_close(run_op(case, x, op, threads, z), reference(case, x, op, z))


def assert_close(y: np.ndarray, ref: np.ndarray) -> None:
    assert y.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(y - ref).max()) / scale
    assert err <= 1e-4, f"max abs error {err:.3g} relative to output scale {scale:.3g}"


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[ConvCase, np.ndarray, int, str]:
    kind = draw(st.sampled_from(["dense-groups", "two-groups", "depthwise"]))
    if kind == "depthwise":
        group = draw(st.integers(1, 6))
        cin, cout = group, group * draw(st.sampled_from([1, 2]))
    else:
        group = 1 if kind == "dense-groups" else 2
        cin, cout = group * draw(st.integers(1, 6)), group * draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 3, 5, 7, 2, 4]))
    kw = draw(st.sampled_from([k, k, k, 1, 3]))
    stride = draw(st.sampled_from([1, 2, 3]))
    stride_w = draw(st.sampled_from([stride, stride, 1]))
    dil = draw(st.sampled_from([1, 1, 2]))
    pads = tuple(draw(st.lists(st.integers(0, 3), min_size=4, max_size=4)))
    need_h = (k - 1) * dil + 1 - pads[0] - pads[2]
    need_w = (kw - 1) * dil + 1 - pads[1] - pads[3]
    h = max(draw(st.integers(1, 19)), need_h, 1)
    w = max(draw(st.integers(1, 37)), need_w, 1)
    n = draw(st.sampled_from([1, 1, 2, 3, 8, 16]))
    density = draw(st.sampled_from([0.0, 0.15, 0.5, 1.0]))
    threads = draw(st.sampled_from([1, 2]))
    op = draw(st.sampled_from(OPS))
    block = draw(st.sampled_from([1, 1, 4, 5]))  # runs of output channels sharing a fan-in
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    case = random_case(rng, cin, cout, (k, kw), density, group=group, strides=(stride, stride_w),
                       pads=pads, dilations=(dil, dil), block=block)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    return case, x, threads, op


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_matches_dense_conv(args: tuple[ConvCase, np.ndarray, int, str]) -> None:
    """Any kernel size, stride, pads, dilation, groups, batch 1-16, 1 or 2 threads, every op
    (fused activations, residual sum input), with or without runs of output channels that share a
    fan-in, equals ORT's dense Conv (+ Z, + activation)."""
    case, x, threads, op = args
    ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = np.random.default_rng(x.size).standard_normal(ref.shape).astype(np.float32)
    assert_close(run_op(case, x, op, threads, z), reference(case, x, op, z))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize(
    "cin,cout,k,hw,stride,pad,n",
    [
        (16, 24, 3, 8, 1, 1, 2),     # narrow plane: AVX2 width even on AVX-512 CPUs
        (16, 24, 3, 28, 1, 1, 2),    # wide plane, partial last vector
        (32, 24, 3, 14, 1, 1, 2),    # 14 rows of one 16-float vector: blocks of 14 / 7 rows
        (32, 24, 3, 14, 1, 0, 1),    # 'valid' 14x14 -> 12x12 (padded copy, no lane rotations)
        (16, 16, 3, 33, 2, 1, 1),    # stride 2, odd size
        (24, 16, 1, 13, 1, 0, 3),    # pointwise (no padded copy), vector tail
        (24, 16, 1, 13, 2, 0, 1),    # strided 1x1
        (8, 8, 5, 17, 1, 2, 1),
        (8, 8, 7, 23, 2, 3, 1),
        (96, 32, 3, 16, 1, 1, 1),    # many connections per output: L1 chunking
    ],
)
def test_paths_per_isa(monkeypatch: pytest.MonkeyPatch, isa: str, cin: int, cout: int, k: int, hw: int,
                       stride: int, pad: int, n: int) -> None:
    """Every kernel path and ISA variant this CPU can run (SPARSIFY_KERNEL_ISA caps the ISA)."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(cin * 1000 + hw)
    case = random_case(rng, cin, cout, k, 0.4, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("h,w", [(8, 8), (4, 4), (2, 2), (1, 1), (5, 4), (7, 8), (3, 16), (4, 16), (16, 4), (9, 8)])
def test_small_same_planes(monkeypatch: pytest.MonkeyPatch, isa: str, h: int, w: int) -> None:
    """3x3 'same' convs on planes of a few vectors (the permute path on AVX-512), incl. empty rows."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(h * 100 + w)
    for density, group in ((0.0, 1), (0.2, 1), (1.0, 1), (0.5, 2)):
        case = random_case(rng, 12, 10, 3, density, group=group, pads=(1, 1, 1, 1))
        x = rng.standard_normal((3, 12, h, w)).astype(np.float32)
        assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("h,w,pads", [(5, 17, (1, 1, 1, 1)), (3, 32, (0, 1, 2, 1)), (6, 28, (2, 1, 0, 1)),
                                      (2, 64, (1, 1, 1, 1)), (7, 48, (1, 1, 1, 1)), (4, 40, (1, 0, 1, 2))])
def test_wide_rows(monkeypatch: pytest.MonkeyPatch, isa: str, h: int, w: int, pads: tuple[int, int, int, int]) -> None:
    """3x3 stride-1 convs on rows of 1-4 vectors (lane-rotation path for left/right pad 1), any top/bottom pads."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(h * 100 + w)
    case = random_case(rng, 10, 9, 3, 0.4, pads=pads)
    x = rng.standard_normal((2, 10, h, w)).astype(np.float32)
    assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("k,h,w,pads", [(3, 9, 56, (1, 1, 1, 1)), (3, 6, 57, (0, 0, 1, 1)), (3, 5, 33, (1, 2, 0, 0)),
                                        (7, 11, 70, (3, 3, 3, 3)), (5, 7, 31, (2, 0, 2, 3)), (1, 4, 40, (0, 1, 0, 1)),
                                        (3, 4, 112, (1, 1, 1, 1)), (3, 3, 7, (1, 1, 1, 1))])
def test_stride2_rows(monkeypatch: pytest.MonkeyPatch, isa: str, k: int, h: int, w: int,
                      pads: tuple[int, int, int, int]) -> None:
    """Stride-2 convs over padded copies split into even / odd columns: rows of one to several
    vectors, odd widths, left pads from 0 to 3 and asymmetric pads (the row split's edges)."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(k * 1000 + w)
    case = random_case(rng, 6, 5, k, 0.5, strides=(2, 2), pads=pads)
    x = rng.standard_normal((2, 6, h, w)).astype(np.float32)
    assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("k,stride,h,w,pads,mult", [
    (3, 1, 9, 56, (1, 1, 1, 1), 1), (3, 2, 12, 57, (1, 1, 1, 1), 1), (3, 2, 8, 8, (0, 0, 1, 1), 1),
    (5, 1, 7, 7, (2, 2, 2, 2), 1), (5, 2, 11, 40, (1, 2, 3, 1), 1), (3, 1, 5, 17, (0, 2, 2, 0), 2),
    (5, 2, 6, 14, (2, 2, 2, 2), 2), (3, 1, 3, 113, (1, 1, 1, 1), 1)])
def test_depthwise(monkeypatch: pytest.MonkeyPatch, isa: str, k: int, stride: int, h: int, w: int,
                   pads: tuple[int, int, int, int], mult: int) -> None:
    """Depthwise convs (one input channel per output, depth multiplier 1 or 2) straight from X
    with masked loads at the borders: wide, narrow and odd rows, asymmetric pads, stride 2, and an
    output channel whose one connection is pruned (bias only)."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(k * 1000 + w * 10 + stride)
    c = 6
    case = random_case(rng, c, c * mult, k, 1.0, group=c, strides=(stride, stride), pads=pads)
    case.mask[1] = False
    case.weight[1] = 0
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 1, 1, 12), (3, 1, 0, 20), (3, 2, 1, 15), (5, 1, 2, 9)])
def test_large_batch_whole_image_tasks(k: int, stride: int, pad: int, hw: int) -> None:
    """Batch >= 8: one task per image, padded copies in reused buffers, on 2 threads."""
    rng = np.random.default_rng(k * 10 + hw)
    case = random_case(rng, 24, 20, k, 0.3, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((11, 24, hw, hw)).astype(np.float32)
    assert_close(*run_both(case, x, threads=2))


def test_rows_without_connections_give_bias() -> None:
    rng = np.random.default_rng(1)
    case = random_case(rng, 4, 3, 3, 0.0, pads=(1, 1, 1, 1))
    case.mask[:] = False
    case.weight[:] = 0
    y = native.session(sparse_model(case)).run(None, {"X": rng.standard_normal((2, 4, 5, 6)).astype(np.float32)})[0]
    np.testing.assert_array_equal(y, np.broadcast_to(case.bias[None, :, None, None], y.shape))


# --- rejection of malformed inputs: a clear error, never a crash -------------------------------------------------

def _bad_run(case: ConvCase, packed=None, bias=None, **attrs) -> str:
    x = np.ones((1, case.cin, 6, 6), np.float32)
    with pytest.raises(RuntimeBackendError) as exc:
        native.session(sparse_model(case, packed=packed, bias=bias, **attrs)).run(None, {"X": x})
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def case() -> ConvCase:
    return random_case(np.random.default_rng(2), 4, 3, 3, 0.6, pads=(1, 1, 1, 1))


def test_rejects_col_idx_out_of_range(case: ConvCase) -> None:
    w, rp, ci = case.packed()
    ci = ci.copy()
    ci[-1] = 4
    assert "col_idx" in _bad_run(case, packed=(w, rp, ci))
    ci[-1] = -1
    assert "outside [0, 4)" in _bad_run(case, packed=(w, rp, ci))


def test_rejects_bad_row_ptr(case: ConvCase) -> None:
    w, rp, ci = case.packed()
    assert "row_ptr[0]" in _bad_run(case, packed=(w, rp + 1, ci))
    dec = rp.copy()
    dec[1], dec[2] = dec[2], dec[1] - 1
    assert "non-decreasing" in _bad_run(case, packed=(w, dec, ci))
    short = rp.copy()
    short[-1] -= 1
    assert "row_ptr[Cout]" in _bad_run(case, packed=(w, short, ci))


def test_rejects_mismatched_nnz(case: ConvCase) -> None:
    w, rp, ci = case.packed()
    assert "col_idx has" in _bad_run(case, packed=(w, rp, ci[:-1]))
    assert "nnz" in _bad_run(case, packed=(w[:-1], rp, ci))


def test_rejects_duplicates_bias_and_group(case: ConvCase) -> None:
    w, rp, ci = case.packed()
    row = int(np.argmax(np.diff(rp) >= 2))
    dup = ci.copy()
    dup[rp[row] + 1] = dup[rp[row]]
    assert "twice" in _bad_run(case, packed=(w, rp, dup))
    assert "B has" in _bad_run(case, bias=np.zeros(5, np.float32))
    assert "group=2" in _bad_run(case, group=2)


def test_rejects_bad_attributes(case: ConvCase) -> None:
    assert "pads" in _bad_run(case, pads=[1, 1])
    assert "strides" in _bad_run(case, strides=[0, 1])


@pytest.mark.parametrize("isa", ["avx2", "auto"])
@pytest.mark.parametrize(
    "k,stride,dil,pads,h,w,n",
    [
        ((3, 3), 1, 1, (1, 1, 1, 1), 32, 32, 1),   # flat path, strips of whole row blocks
        ((3, 3), 1, 1, (0, 1, 2, 1), 29, 20, 2),   # uneven last strip, asymmetric pads
        ((3, 3), 2, 1, (1, 1, 1, 1), 33, 33, 1),   # direct path, stride 2
        ((5, 5), 1, 1, (2, 2, 2, 2), 26, 17, 3),
        ((7, 7), 2, 1, (3, 3, 3, 3), 40, 24, 1),
        ((3, 3), 1, 2, (2, 2, 2, 2), 24, 24, 1),   # dilation: generic path
        ((2, 4), 3, 1, (0, 1, 3, 2), 45, 21, 1),   # generic path, stride 3
        ((3, 3), 1, 1, (6, 1, 6, 1), 12, 16, 1),   # strips lying wholly in the top / bottom padding
    ],
)
def test_row_strip_tasks(monkeypatch: pytest.MonkeyPatch, isa: str, k: tuple[int, int], stride: int,
                         dil: int, pads: tuple[int, int, int, int], h: int, w: int, n: int) -> None:
    """Batch < 8 with enough work: strips of output rows, each padding only its own input rows."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(h * 100 + w + k[0])
    case = random_case(rng, 24, 32, k, 0.5, strides=(stride, stride), pads=pads, dilations=(dil, dil))
    x = rng.standard_normal((n, 24, h, w)).astype(np.float32)
    for threads in (1, 2):
        assert_close(*run_both(case, x, threads=threads))


@pytest.mark.parametrize("h,w", [(4, 4), (2, 8), (8, 8), (4, 8), (4, 16), (2, 2)])
@pytest.mark.parametrize("group", [1, 4])
def test_small_planes_by_input_channel(h: int, w: int, group: int) -> None:
    """Planes of whole AVX-512 vectors with enough connections go input channel by input channel
    (CSC) in blocks of output channels, 2x2 planes one FMA per connection; one session serves
    several batch sizes (block counts)."""
    rng = np.random.default_rng(h * 10 + w + group)
    for density in (0.1, 0.6):
        case = random_case(rng, 64, 96, 3, density, group=group, pads=(1, 1, 1, 1))
        for threads in (1, 2):
            sparse = native.session(sparse_model(case), threads)
            dense = native.session(dense_model(case), threads, native=False)
            for n in (1, 3, 16, 1):
                x = rng.standard_normal((n, 64, h, w)).astype(np.float32)
                assert_close(sparse.run(None, {"X": x})[0], dense.run(None, {"X": x})[0])


def test_small_planes_weights_fed_at_run_time() -> None:
    """Non-constant weights and indices are regrouped on every call, never served from a cache."""
    rng = np.random.default_rng(5)
    cases = [random_case(rng, 48, 64, 3, d, pads=(1, 1, 1, 1)) for d in (0.3, 0.7)]
    cases[1].bias = cases[0].bias  # B stays an initializer of the session
    sess = native.session(sparse_model(cases[0], weights_as_inputs=True), 2)
    x = rng.standard_normal((2, 48, 4, 4)).astype(np.float32)
    for case in cases + cases[::-1]:
        ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
        assert_close(sess.run(None, {"X": x, **packed_feeds(case)})[0], ref)


@pytest.mark.parametrize("hint", [None, "1", "2", "0", "many"])
def test_thread_count_hint(hint: str | None) -> None:
    """Sessions without sparsify's thread-count entry (plain ORT) or with a nonsense one split the
    work their own way and still compute the same; the entry changes only how work is split."""
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(str(native.library_path()))
    if hint is not None:
        so.add_session_config_entry(native.THREADS_CONFIG_KEY, hint)
    for hw, k, density in ((32, 3, 0.3), (4, 3, 0.6), (8, 3, 0.6), (20, 5, 0.5)):
        case = random_case(rng, 32, 48, k, density, pads=(k // 2,) * 4)
        sess = ort.InferenceSession(sparse_model(case), so, providers=["CPUExecutionProvider"])
        for n in (1, 2, 9):
            x = rng.standard_normal((n, 32, hw, hw)).astype(np.float32)
            ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
            assert_close(sess.run(None, {"X": x})[0], ref)


def break_runs(case: ConvCase, rng: np.random.Generator) -> None:
    """Breaks the shared-fan-in run at channel 5 (same fan-in count, one input channel moved) and
    empties channels 9 and 10 (bias only): neither may be merged into a block."""
    row = case.mask[5]
    on, off = np.flatnonzero(row), np.flatnonzero(~row)
    if len(on) and len(off):
        row[on[0]], row[off[0]] = False, True
        case.weight[5, off[0]] = rng.standard_normal(case.weight.shape[2:])
        case.weight[5, on[0]] = 0
    case.mask[9:11] = False
    case.weight[9:11] = 0


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize(
    "cin,cout,k,hw,stride,n,block,group",
    [
        (64, 48, 1, 56, 1, 1, 4, 1),    # 56x56: whole 4-vector chunks, several pixel tiles
        (40, 30, 1, 13, 1, 3, 3, 1),    # runs of 3: no block, one channel at a time
        (40, 24, 1, 23, 1, 2, 5, 1),    # runs of 5: a block of 4 and one single channel per run
        (256, 64, 1, 14, 1, 2, 8, 1),   # 14x14: 3 chunks of 4 vectors and a masked 4-pixel vector
        (512, 64, 1, 7, 1, 2, 4, 1),    # 7x7 (8-float vectors on AVX-512), long connection lists
        (48, 44, 1, 9, 1, 2, 6, 2),     # two groups of 22: runs cut at the group boundary
        (48, 40, 1, 14, 2, 1, 4, 1),    # strided 1x1 over the subsampled input
        (64, 48, 3, 56, 2, 1, 4, 1),    # 3x3/s2 (the direct path's block unit), row strips
        (96, 40, 3, 28, 2, 2, 5, 1),    # 3x3/s2 to 14x14, runs of 5
        (64, 64, 3, 14, 2, 3, 4, 2),    # 3x3/s2 to 7x7, two groups, whole images per task
        (32, 24, 3, 17, 2, 1, 4, 1),    # odd plane: partial vectors and rows
    ],
)
def test_shared_fan_in_blocks(monkeypatch: pytest.MonkeyPatch, isa: str, cin: int, cout: int, k: int, hw: int,
                              stride: int, n: int, block: int, group: int) -> None:
    """1x1 and 3x3/s2 convs whose runs of output channels share one fan-in (the transform's block
    sparsity) take the kernel's block units (4 channels per loaded input vector): equal to dense
    Conv for every op, 1 and 2 threads (thread ranges snapped to blocks), with runs that almost
    share a fan-in (one column moved in one channel) and channels without connections mixed in,
    which must not be merged into a block."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(cin + cout + hw + block + k)
    for density in (0.1, 0.5):
        case = random_case(rng, cin, cout, k, density, group=group, block=block, strides=(stride, stride),
                           pads=(k // 2,) * 4)
        break_runs(case, rng)
        assert_plain_sum_and_pre_ops(case, rng.standard_normal((n, cin, hw, hw)).astype(np.float32), rng)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize(
    "cin,cout,k,hw,n,fan_in,group",
    [
        (3, 64, 7, 45, 2, 1, 1),   # a ResNet stem: each channel reads one of three input channels
        (3, 32, 3, 39, 1, 1, 1),   # a MobileNet stem
        (3, 24, 7, 30, 2, 2, 1),   # two of three: three distinct fan-ins
        (6, 40, 3, 33, 1, 1, 2),   # two groups: channels regrouped within their group only
    ],
)
def test_stems_with_repeated_fan_ins(monkeypatch: pytest.MonkeyPatch, isa: str, cin: int, cout: int, k: int,
                                     hw: int, n: int, fan_in: int, group: int) -> None:
    """Strided convs from a few input channels whose output channels repeat the same fan-ins in
    no particular order (sparse-random on a stem) run with the channels that share a fan-in
    regrouped into blocks of four: equal to dense Conv for every op, 1 and 2 threads, with empty
    channels mixed in, and the same with the connections fed at run time (not regrouped)."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(cin * cout + k + fan_in)
    cin_g = cin // group
    mask = np.zeros((cout, cin_g), bool)
    for o in range(cout):
        mask[o, rng.choice(cin_g, fan_in, replace=False)] = True
    mask[[3, 10]] = False  # bias only
    weight = rng.standard_normal((cout, cin_g, k, k)).astype(np.float32) * mask[:, :, None, None]
    case = ConvCase(weight=weight, mask=mask, bias=rng.standard_normal(cout).astype(np.float32), group=group,
                    strides=(2, 2), pads=(k // 2,) * 4)
    x = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    assert_plain_sum_and_pre_ops(case, x, rng)
    ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    fed = native.session(sparse_model(case, weights_as_inputs=True), 2)
    assert_close(fed.run(None, {"X": x, **packed_feeds(case)})[0], ref)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("hw,stride", [(7, 1), (9, 1), (6, 1), (10, 1), (14, 1), (17, 1), (5, 1), (14, 2), (13, 2)])
def test_shared_fan_in_tails(monkeypatch: pytest.MonkeyPatch, isa: str, hw: int, stride: int) -> None:
    """1x1 planes that leave 1-4 pixels over whole vectors (7x7: 49 = 3 x 16 + 1 on AVX-512, 6 x 8
    + 1 on AVX2, 12 x 4 + 1 on the baseline; 14x14: 12 x 16 + 4; 6x6 and 10x10: + 4; 17x17: five
    passes + 1) carry them across each block of four channels with interleaved constant weights:
    equal to dense Conv with the sum and pre ops, 1 and 2 threads, a run broken at channel 5 and
    empty channels, and the same with the weights fed at run time (no interleaved copy)."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(hw * 10 + stride)
    for density in (0.1, 0.5):
        case = random_case(rng, 72, 44, 1, density, block=4, strides=(stride, stride))
        break_runs(case, rng)
        x = rng.standard_normal((2, 72, hw, hw)).astype(np.float32)
        assert_plain_sum_and_pre_ops(case, x, rng)
        ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
        fed = native.session(sparse_model(case, weights_as_inputs=True), 2)
        assert_close(fed.run(None, {"X": x, **packed_feeds(case)})[0], ref)


@pytest.mark.parametrize("isa", ["avx2", "auto"])
@pytest.mark.parametrize(
    "k,stride,pads,dil,hw,group,n",
    [
        (3, 1, (1, 1, 1, 1), 1, 7, 1, 1),   # 3x3 'same' on 7x7: flat masked shifts
        (3, 1, (1, 1, 1, 1), 1, 7, 2, 3),   # two groups, three images
        (5, 1, (2, 2, 2, 2), 1, 7, 1, 2),   # 5x5 'same'
        (3, 1, (2, 2, 2, 2), 2, 7, 1, 1),   # dilation 2
        (3, 1, (0, 2, 2, 0), 1, 7, 1, 1),   # asymmetric pads: rows as wide as the output's, shifted
        (3, 1, (0, 0, 0, 0), 1, 9, 1, 2),   # 'valid' 9x9 -> 7x7: row copies
        (3, 2, (1, 1, 1, 1), 1, 14, 1, 2),  # 3x3/s2 14x14 -> 7x7: strided row copies
        (3, 2, (1, 1, 1, 1), 1, 13, 2, 1),  # odd input, two groups
        (3, 1, (1, 1, 1, 1), 1, 6, 1, 2),   # 6x6: 36 = 2 x 16 + 4
        ((1, 3), 1, (0, 1, 0, 1), 1, 7, 1, 1),  # 1x3 kernel
    ],
)
def test_im2col_small_planes(monkeypatch: pytest.MonkeyPatch, isa: str, k: int | tuple[int, int], stride: int,
                             pads: tuple[int, int, int, int], dil: int, hw: int, group: int, n: int) -> None:
    """kxk convs with shared-fan-in blocks whose output plane is a few vectors plus a few pixels
    (7x7, 6x6 on AVX-512) run as the 1x1 unit over the input's shifted copies (im2col): equal to
    dense Conv with the sum and pre ops (the pre-activation before the zero pads), 1 and 2
    threads, a run broken at channel 5 and empty channels; weights fed at run time take the
    direct paths and agree too."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(hw * 100 + stride * 10 + group + dil)
    for density in (0.1, 0.5):
        case = random_case(rng, 48, 40, k, density, group=group, block=4, strides=(stride, stride), pads=pads,
                           dilations=(dil, dil))
        break_runs(case, rng)
        x = rng.standard_normal((n, 48, hw, hw)).astype(np.float32)
        assert_plain_sum_and_pre_ops(case, x, rng)
        ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
        fed = native.session(sparse_model(case, weights_as_inputs=True), 2)
        assert_close(fed.run(None, {"X": x, **packed_feeds(case)})[0], ref)


@pytest.mark.parametrize(
    "k,stride,pad,hw,n",
    [(3, 1, 1, 32, 1), (3, 1, 1, 32, 9), (3, 1, 1, 8, 1), (3, 1, 1, 4, 16), (3, 1, 1, 2, 3),
     (3, 2, 1, 17, 2), (1, 1, 0, 12, 1), (5, 1, 2, 11, 1), (2, 1, 0, 9, 1)],
)
def test_fused_activations_on_every_path(k: int, stride: int, pad: int, hw: int, n: int) -> None:
    """SparseConvRelu equals Relu(Conv), SparseConvClip Clip(Conv), on each path (strips, whole images, by input channel, 2x2,
    direct, pointwise, generic), on 1 and 2 threads."""
    rng = np.random.default_rng(k * 100 + hw + n)
    case = random_case(rng, 48, 40, k, 0.4, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((n, 48, hw, hw)).astype(np.float32)
    ref = np.maximum(native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0], 0)
    assert (ref == 0).any() and (ref > 0).any()
    for threads in (1, 2):
        y = native.session(sparse_model(case, op_type="SparseConvRelu"), threads).run(None, {"X": x})[0]
        assert_close(y, ref)
        lo, hi = -0.5, 2.0
        y = native.session(sparse_model(case, op_type="SparseConvClip", min=lo, max=hi), threads).run(None, {"X": x})[0]
        conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
        assert_close(y, np.clip(conv, lo, hi))


def test_clip_bounds() -> None:
    """SparseConvClip without bounds is the plain conv; min > max is refused at session creation."""
    rng = np.random.default_rng(2)
    case = random_case(rng, 16, 8, 3, 0.5, pads=(1,) * 4)
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    assert_close(native.session(sparse_model(case, op_type="SparseConvClip"), 1).run(None, {"X": x})[0], ref)
    only_max = native.session(sparse_model(case, op_type="SparseConvClip", max=0.25), 2).run(None, {"X": x})[0]
    assert_close(only_max, np.minimum(ref, 0.25))
    with pytest.raises(RuntimeBackendError, match="min <= max"):
        native.session(sparse_model(case, op_type="SparseConvClip", min=1.0, max=0.0), 1)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("hw", [1, 2, 3, 4, 5, 8, 9, 12, 16, 23])
def test_pointwise_planes(monkeypatch: pytest.MonkeyPatch, isa: str, hw: int) -> None:
    """1x1 convs on every plane size class: partial last vectors (masked on AVX-512), 1-8 vectors
    with several accumulator sets, whole 8-vector chunks, and rows with 0 to many connections."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(hw)
    for density in (0.05, 0.3, 1.0):
        case = random_case(rng, 40, 24, 1, density)
        x = rng.standard_normal((3, 40, hw, hw)).astype(np.float32)
        assert_close(*run_both(case, x, threads=2))


@pytest.mark.parametrize("w", [14, 31, 33, 56, 57, 70])
def test_strided_pointwise_row_ends(w: int) -> None:
    """A 1x1/s2 conv reads its input subsampled: each row's even columns as whole vectors, the
    row's last ones with masked loads that never read past it (Wo 7, 16 from a 31-wide row, 17,
    28, 29, 35). Equal to the dense conv on 1 and 2 threads, with the sum and pre ops."""
    rng = np.random.default_rng(w)
    case = random_case(rng, 40, 24, 1, 0.3, strides=(2, 2))
    x = rng.standard_normal((2, 40, 9, w)).astype(np.float32)
    assert_plain_sum_and_pre_ops(case, x, rng)


@pytest.mark.parametrize("split", ["0", "1"])
@pytest.mark.parametrize("hw,stride", [(7, 1), (10, 1), (9, 1), (3, 1), (14, 2)])
def test_pointwise_small_planes_either_vector_width(monkeypatch: pytest.MonkeyPatch, split: str, hw: int,
                                                    stride: int) -> None:
    """1x1 convs on small planes that leave a few pixels over whole vectors (7x7: 49 = 3 x 16 + 1)
    run on 8-float vectors where the CPU splits 16-float FMAs (SPARSIFY_KERNEL_SPLIT_WIDE=1) and on
    the wide unit's masked last vector elsewhere (=0): both equal the dense conv, plain, with the
    fused sum input and with the pre-activation, on 1 and 2 threads."""
    monkeypatch.setenv("SPARSIFY_KERNEL_SPLIT_WIDE", split)
    rng = np.random.default_rng(hw * 10 + stride)
    case = random_case(rng, 64, 40, 1, 0.15, strides=(stride, stride))
    x = rng.standard_normal((2, 64, hw, hw)).astype(np.float32)
    assert_plain_sum_and_pre_ops(case, x, rng)


@pytest.mark.parametrize("split", ["0", "1"])
@pytest.mark.parametrize("hw,stride", [(7, 1), (10, 1), (14, 2)])
def test_pointwise_small_planes_aligned_rows(monkeypatch: pytest.MonkeyPatch, split: str, hw: int, stride: int) -> None:
    """1x1 convs on small planes (49, 100 pixels) at density 1/8 with each input row read by 24
    output channels: the kernel copies the rows to aligned ones the plane's length rounded up to
    whole vectors apart (56 floats on the 8-float unit, 64 on the 16-float one) before the
    connections stream over them. Equal to the dense conv, plain, with the sum and the
    pre-activation, on 1 and 2 threads."""
    monkeypatch.setenv("SPARSIFY_KERNEL_SPLIT_WIDE", split)
    rng = np.random.default_rng(hw * 3 + stride)
    case = random_case(rng, 64, 192, 1, 0.125, strides=(stride, stride))
    x = rng.standard_normal((2, 64, hw, hw)).astype(np.float32)
    assert_plain_sum_and_pre_ops(case, x, rng)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize(
    "cin,cout,group,stride,hw,n,offset",  # offset: floats past a 64-byte boundary
    [
        (32, 64, 1, 1, 14, 2, 0),   # 784-byte planes: rows off vector boundaries
        (32, 64, 2, 1, 14, 1, 0),   # two groups: each block copies its groups' rows
        (40, 48, 1, 1, 56, 1, 1),   # aligned plane size, input one float off a boundary
        (24, 40, 1, 1, 17, 3, 3),   # odd plane, partial last vector of each row
        (48, 64, 1, 2, 28, 3, 1),   # strided: the subsampled copy has 14x14 planes
    ],
)
def test_pointwise_aligned_row_copies(monkeypatch: pytest.MonkeyPatch, isa: str, cin: int, cout: int, group: int,
                                      stride: int, hw: int, n: int, offset: int) -> None:
    """1x1 convs whose input rows do not start on vector boundaries, with one fan-in per output
    channel read often enough (density 0.6: each input row read by 0.6 x Cout channels) that the
    kernel first copies each tile's rows to aligned ones: plain, with the residual sum and Relu
    fused, on 1 thread (one task: the copy is made) and 2."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(cin + hw + offset)
    case = random_case(rng, cin, cout, 1, 0.6, group=group, strides=(stride, stride))
    x = vector_aligned(rng.standard_normal((n, cin, hw, hw)).astype(np.float32), 4 * offset)
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = rng.standard_normal(conv.shape).astype(np.float32)
    for threads in (1, 2):
        for op in ("SparseConv", "SparseConvAddRelu"):
            assert_close(run_op(case, x, op, threads, z), reference(case, x, op, z))


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,hw,n",
    [
        (64, 48, 1, 1, 0, 56, 1),     # 1x1 on a 56x56 plane: pixel tiles over output channels
        (32, 96, 1, 1, 0, 56, 3),     # several images, several tiles per image
        (512, 64, 1, 1, 0, 7, 2),     # 1x1 on 7x7: one tile with a partial vector, long connection lists
        (256, 64, 1, 1, 0, 14, 1),
        (64, 48, 1, 2, 0, 56, 1),     # strided 1x1: subsampled input
        (96, 40, 1, 2, 0, 14, 3),     # to 7x7
        (24, 16, 1, 3, 0, 20, 2),     # stride 3, odd plane
        (48, 40, 3, 2, 1, 56, 1),     # 3x3/s2 on a large plane
        (64, 64, 3, 2, 1, 14, 2),     # 3x3/s2 to 7x7
        (64, 64, 3, 1, 1, 7, 2),      # 3x3/s1 on 7x7
        (48, 48, 3, 1, 1, 14, 1),
        (32, 32, 3, 1, 1, 56, 1),     # 3x3/s1 on 56x56: row strips
    ],
)
def test_imagenet_size_shapes(cin: int, cout: int, k: int, stride: int, pad: int, hw: int, n: int) -> None:
    """The layer shapes of 224x224 ResNets (fewer channels), on 1 and 2 threads, plain and with the
    residual sum input and Relu fused."""
    rng = np.random.default_rng(cin + 7 * hw + k)
    case = random_case(rng, cin, cout, k, 0.15, strides=(stride, stride), pads=(pad,) * 4)
    assert_plain_sum_and_pre_ops(case, rng.standard_normal((n, cin, hw, hw)).astype(np.float32), rng)


@pytest.mark.parametrize(
    "k,stride,pad,hw,n",
    [(3, 1, 1, 32, 1), (3, 1, 1, 32, 9), (3, 1, 1, 8, 1), (3, 1, 1, 4, 16), (3, 1, 1, 2, 3),
     (3, 2, 1, 17, 2), (1, 1, 0, 12, 1), (1, 2, 0, 12, 2), (5, 1, 2, 11, 1), (2, 1, 0, 9, 1),
     (1, 1, 0, 7, 2), (1, 2, 0, 14, 1)],  # pointwise on 7x7: 8-float vectors, a masked last one
)
@pytest.mark.parametrize("op", ["SparseConvAdd", "SparseConvAddRelu"])
def test_sum_input_on_every_path(k: int, stride: int, pad: int, hw: int, n: int, op: str) -> None:
    """SparseConvAdd equals Conv + Z and SparseConvAddRelu Relu(Conv + Z) on each path (strips,
    whole images, by input channel, 2x2, direct, pointwise incl. 7x7 planes, strided pointwise,
    generic), on 1 and 2 threads."""
    rng = np.random.default_rng(k * 100 + hw + n)
    case = random_case(rng, 48, 40, k, 0.4, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((n, 48, hw, hw)).astype(np.float32)
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = 3 * rng.standard_normal(conv.shape).astype(np.float32)
    ref = reference(case, x, op, z)
    assert not np.allclose(ref, reference(case, x, "SparseConvRelu" if op.endswith("Relu") else "SparseConv"))
    for threads in (1, 2):
        assert_close(run_op(case, x, op, threads, z), ref)


def test_sum_input_must_match_the_output() -> None:
    """A Z that would broadcast (or does not fit) is refused with one clear line."""
    rng = np.random.default_rng(3)
    case = random_case(rng, 8, 6, 3, 0.5, pads=(1,) * 4)
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    sess = native.session(sparse_model(case, op_type="SparseConvAdd"), 1)
    for shape in [(2, 6, 5, 1), (1, 6, 5, 5), (2, 6, 4, 5)]:
        with pytest.raises(RuntimeBackendError, match="sum input Z has shape") as exc:
            sess.run(None, {"X": x, "Z": np.zeros(shape, np.float32)})
        assert "\n" not in str(exc.value)


def test_large_outputs_streamed() -> None:
    """A 1x1 conv whose output exceeds 16 MB is written with non-temporal stores: same values,
    with and without the fused sum input, on 1 and 2 threads."""
    rng = np.random.default_rng(12)
    case = random_case(rng, 32, 512, 1, 0.2)
    x = rng.standard_normal((2, 32, 64, 64)).astype(np.float32)
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    assert conv.nbytes >= 16 << 20
    z = rng.standard_normal(conv.shape).astype(np.float32)
    for threads in (1, 2):
        for op in ("SparseConv", "SparseConvAddRelu"):
            assert_close(run_op(case, x, op, threads, z), reference(case, x, op, z))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("h,w,pads", [(7, 7, (1, 1, 1, 1)), (9, 5, (0, 2, 1, 0)), (11, 6, (2, 0, 0, 2)),
                                      (7, 3, (1, 2, 2, 1)), (13, 7, (0, 0, 0, 0)), (5, 2, (1, 2, 1, 2))])
def test_narrow_rows(monkeypatch: pytest.MonkeyPatch, isa: str, h: int, w: int, pads: tuple[int, int, int, int]) -> None:
    """3x3 stride-1 convs on planes whose output rows are at most half a vector (several rows per
    vector, kx-shifted copies built by masked loads on AVX-512), any pads."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(h * 100 + w)
    case = random_case(rng, 20, 12, 3, 0.4, pads=pads)
    x = rng.standard_normal((2, 20, h, w)).astype(np.float32)
    for threads in (1, 2):
        assert_close(*run_both(case, x, threads=threads))


@pytest.mark.parametrize(
    "k,stride,pad,hw,n,group",
    [(1, 1, 0, 14, 1, 1), (1, 1, 0, 56, 2, 1), (1, 1, 0, 7, 3, 2), (1, 2, 0, 12, 2, 1), (3, 1, 1, 28, 1, 1),
     (3, 1, 1, 7, 2, 1), (3, 1, 1, 4, 16, 1), (3, 2, 1, 17, 1, 2), (5, 1, 2, 9, 1, 1)],
)
@pytest.mark.parametrize("op", ["SparseConvPre", "SparseConvPreRelu"])
def test_pre_activation_on_every_path(k: int, stride: int, pad: int, hw: int, n: int, group: int, op: str) -> None:
    """SparseConvPre convolves Relu(X * S + T) (S, T per input channel; the padding stays zero):
    per pixel tile on stride-1 1x1 convs, from a transformed copy on the others; 1 and 2 threads."""
    rng = np.random.default_rng(k * 100 + hw + n)
    case = random_case(rng, 48, 40, k, 0.3, group=group, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((n, 48, hw, hw)).astype(np.float32)
    ref = reference(case, x, op)
    assert not np.allclose(ref, reference(case, x, "SparseConvRelu" if op.endswith("Relu") else "SparseConv"))
    for threads in (1, 2):
        assert_close(run_op(case, x, op, threads), ref)


@pytest.mark.parametrize(
    "k,stride,pad,hw,n,group,pieces",
    [(1, 1, 0, 14, 1, 1, (16, 8, 8, 16)), (1, 1, 0, 56, 2, 1, (32, 16)), (1, 1, 0, 7, 3, 2, (8, 8, 8, 24)),
     (1, 1, 0, 5, 8, 1, (1, 47)), (1, 2, 0, 12, 2, 1, (40, 8)), (3, 1, 1, 28, 1, 1, (16, 32)),
     (3, 1, 1, 7, 2, 1, (24, 12, 12)), (3, 2, 1, 17, 1, 2, (20, 28))],
)
@pytest.mark.parametrize("op", ["SparseConvPre", "SparseConvPreRelu"])
def test_pre_activation_of_pieces(k: int, stride: int, pad: int, hw: int, n: int, group: int,
                                  pieces: tuple[int, ...], op: str) -> None:
    """A pre op whose input comes in pieces (inputs X, X_2, .. after T) convolves the
    pre-activation of their channel Concat, natively on 1 and 2 threads and through the function
    body; pieces that cross a group boundary too."""
    rng = np.random.default_rng(k * 1000 + hw + n + len(pieces))
    case = random_case(rng, 48, 40, k, 0.3, group=group, strides=(stride, stride), pads=(pad,) * 4)
    x = rng.standard_normal((n, 48, hw, hw)).astype(np.float32)
    ref = reference(case, x, op)
    feeds = split_input(x, pieces)
    pre = pre_params(case.cin)
    for threads in (1, 2):
        assert_close(native.session(sparse_model(case, op_type=op, pre=pre, pieces=pieces), threads).run(None, feeds)[0], ref)
    body = sparse_model(case, op_type=op, pre=pre, pieces=pieces, function_body=True)
    assert_close(native.session(body, 1, native=False).run(None, feeds)[0], ref)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "auto"])
@pytest.mark.parametrize("k,hw", [(1, 13), (3, 9)])
def test_pre_activation_of_pieces_per_isa(monkeypatch: pytest.MonkeyPatch, isa: str, k: int, hw: int) -> None:
    """The 1x1 tile packer and the pre-activation pass read pieces in every ISA's build."""
    if isa != "auto":
        monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(k + hw)
    case = random_case(rng, 24, 16, k, 0.4, pads=(k // 2,) * 4)
    x = rng.standard_normal((2, 24, hw, hw)).astype(np.float32)
    model = sparse_model(case, op_type="SparseConvPreRelu", pre=pre_params(24), pieces=(3, 13, 8))
    for threads in (1, 2):
        assert_close(native.session(model, threads).run(None, split_input(x, (3, 13, 8)))[0],
                     reference(case, x, "SparseConvPreRelu"))


def test_pieces_must_agree_but_on_channels() -> None:
    """Pieces of another batch size or plane, or a wrong channel total, are refused in one line."""
    rng = np.random.default_rng(5)
    case = random_case(rng, 8, 6, 1, 0.5)
    model = sparse_model(case, op_type="SparseConvPre", pre=pre_params(8), pieces=(5, 3))
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    sess = native.session(model, 1)
    for bad, match in [(x[:1, 5:], "agree on every axis but the channel"), (x[:, 5:, :4], "agree on every axis"),
                       (x[:, 4:], "one per input channel")]:
        with pytest.raises(RuntimeBackendError, match=match) as exc:
            sess.run(None, {"X": x[:, :5], "X_2": np.ascontiguousarray(bad)})
        assert "\n" not in str(exc.value)


def test_pre_activation_inputs_must_match_the_channels() -> None:
    """S and T need one entry per input channel; anything else is refused in one line."""
    rng = np.random.default_rng(4)
    case = random_case(rng, 8, 6, 1, 0.5)
    s, t = pre_params(8)
    x = rng.standard_normal((1, 8, 5, 5)).astype(np.float32)
    for pre in [(s[:7], t), (s, np.concatenate([t, t]))]:
        with pytest.raises(RuntimeBackendError, match="one per input channel") as exc:
            native.session(sparse_model(case, op_type="SparseConvPre", pre=pre), 1).run(None, {"X": x})
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2)])
def test_large_inputs_in_strips(k: int, stride: int) -> None:
    """Inputs of 4 MB and more go strip by strip with the next strip's rows prefetched: same values
    on 1 and 2 threads, plain and with the sum input and Relu."""
    rng = np.random.default_rng(k + stride)
    case = random_case(rng, 64, 32, k, 0.15, strides=(stride, stride), pads=(1,) * 4)
    x = rng.standard_normal((4, 64, 64, 64)).astype(np.float32)
    assert x.nbytes >= 4 << 20
    ref = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = rng.standard_normal(ref.shape).astype(np.float32)
    for threads in (1, 2):
        for op in ("SparseConv", "SparseConvAddRelu"):
            assert_close(run_op(case, x, op, threads, z), reference(case, x, op, z))


def max_pool_reference(y: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
                       pads: tuple[int, int, int, int]) -> np.ndarray:
    """ONNX MaxPool (ceil_mode 0, dilations 1) of y [N, C, H, W] in numpy: -inf in the pads."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, strides, pads
    padded = np.pad(y, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    return win[:, :, ::sh, ::sw].max(axis=(-2, -1))


POOLS = [((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (1, 1), (1, 1, 1, 1)),
         ((3, 2), (2, 1), (2, 0, 0, 1)), ((3, 3), (3, 3), (0, 0, 0, 0)), ((1, 1), (2, 2), (0, 0, 0, 0))]


# every pool on the widest unit; the narrower units' vectors on a stride-2 and a stride-1 pool
@pytest.mark.parametrize("isa,pool", [("auto", p) for p in POOLS] + [(i, POOLS[j]) for i in ("baseline", "avx2")
                                                                     for j in (0, 3)])
@pytest.mark.parametrize("k,stride,pad,h,w,n", [(7, 2, 3, 45, 45, 1), (3, 1, 1, 17, 40, 3), (1, 1, 0, 5, 70, 2)])
def test_fused_max_pool(monkeypatch: pytest.MonkeyPatch, isa: str, pool: tuple, k: int, stride: int, pad: int,
                        h: int, w: int, n: int) -> None:
    """A SparseConv with pool_* attributes equals MaxPool of the conv's output (after the
    activation or the residual sum) natively, per ISA, on 1 and 2 threads, and through its
    function body; strides 2 (even / odd column split), 1 and 3 (the scalar loop), odd planes and
    row tails, asymmetric pads."""
    monkeypatch.setenv("SPARSIFY_KERNEL_ISA", isa)
    rng = np.random.default_rng(k * 1000 + h * w + n)
    case = random_case(rng, 6, 20, k, 0.5, strides=(stride, stride), pads=(pad,) * 4)
    x = (3 * rng.standard_normal((n, 6, h, w))).astype(np.float32)
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    z = rng.standard_normal(conv.shape).astype(np.float32)
    kernel, strides, pads = pool
    attrs = dict(pool_kernel_shape=list(kernel), pool_strides=list(strides), pool_pads=list(pads))
    for op, pre_pool in (("SparseConvRelu", np.maximum(conv, 0)), ("SparseConvAdd", conv + z)):
        ref = max_pool_reference(pre_pool, kernel, strides, pads)
        assert ref.shape[2] < conv.shape[2] or strides[0] == 1
        feeds = {"X": x, **({"Z": z} if op == "SparseConvAdd" else {})}
        for threads in (1, 2):
            assert_close(native.session(sparse_model(case, op_type=op, **attrs), threads).run(None, feeds)[0], ref)
        body = sparse_model(case, op_type=op, function_body=True, **attrs)
        assert_close(native.session(body, 1, native=False).run(None, feeds)[0], ref)


def test_fused_max_pool_of_wide_rows() -> None:
    """Rows wider than the pool's row buffers (4096 floats) take the scalar loop."""
    rng = np.random.default_rng(5)
    case = random_case(rng, 2, 3, 1, 1.0)
    x = rng.standard_normal((1, 2, 3, 4200)).astype(np.float32)
    conv = native.session(dense_model(case), 1, native=False).run(None, {"X": x})[0]
    attrs = dict(pool_kernel_shape=[3, 3], pool_strides=[2, 2], pool_pads=[1, 1, 1, 1])
    y = native.session(sparse_model(case, **attrs), 1).run(None, {"X": x})[0]
    assert_close(y, max_pool_reference(conv, (3, 3), (2, 2), (1, 1, 1, 1)))


def test_fused_max_pool_attributes_checked() -> None:
    """Pads as large as the pool window are refused when the session is made, a pool window larger
    than the padded conv output when the op runs: one line each."""
    case = random_case(np.random.default_rng(6), 4, 4, 3, 0.5, pads=(1,) * 4)
    with pytest.raises(RuntimeBackendError, match="must be smaller than pool_kernel_shape") as exc:
        native.session(sparse_model(case, pool_kernel_shape=[2, 2], pool_pads=[2, 0, 0, 0]), 1)
    assert "\n" not in str(exc.value)
    msg = _bad_run(case, pool_kernel_shape=[9, 9], pool_pads=[0, 0, 0, 0])
    assert "is smaller than pool_kernel_shape" in msg
