"""Tests of the CUDA implementation of ``torch.ops.diffmem.knn_topk``.

The op is compared against an exact float64 brute force computed on the CPU
(direct differences), sorted by (distance, index).

Tile sizes can be shrunk through environment variables that only the CUDA
implementation reads (on every call), so that small problems span many tiles:
``DIFFMEM_KNN_TILE_Q``, ``DIFFMEM_KNN_TILE_N``; ``DIFFMEM_KNN_FORCE_FALLBACK=1``
forces the exact brute-force fallback of the float path for every query.
"""

import warnings

import pytest
import torch
from helpers import FLOAT64_RANGE_END_CASES, float64_range_end_rows, matmul_precision_state, reset_matmul_precision

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

# With a GPU, a missing or CPU-only build is a failure, not a skip: a GPU session that
# skipped every test would look clean.
try:
    import diffmem._C  # noqa: F401  (registers torch.ops.diffmem.*)
except Exception as exc:  # pragma: no cover - depends on the build
    pytest.fail(f"diffmem._C could not be imported: {exc}", pytrace=False)
if not torch.ops.diffmem.built_with_cuda():
    pytest.fail("diffmem._C was built without its CUDA kernels", pytrace=False)

knn_topk = torch.ops.diffmem.knn_topk

DEVICE = torch.device("cuda")


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------

def reference_topk(x, y, k):
    """Exact float64 brute force on the CPU, rows sorted by (dist, idx)."""
    x = x.cpu().double()
    y = y.cpu().double()
    q, n, d = x.shape[0], y.shape[0], x.shape[1]
    chunk = max(1, int(2e7 // max(1, n * d)))
    out_d, out_i = [], []
    for s in range(0, q, chunk):
        dist = ((x[s:s + chunk, None, :] - y[None]) ** 2).sum(-1)
        # columns are in index order: a stable sort orders ties by index
        vals, idx = torch.sort(dist, dim=1, stable=True)
        out_d.append(vals[:, :k])
        out_i.append(idx[:, :k])
    return torch.cat(out_d), torch.cat(out_i)


def run(x, y, k):
    return knn_topk(x.to(DEVICE).contiguous(), y.to(DEVICE).contiguous(), k)


def check(x, y, k):
    d, i = run(x, y, k)
    q = x.shape[0]
    assert d.shape == (q, k) and i.shape == (q, k)
    assert i.dtype == torch.int64
    assert d.is_cuda and i.is_cuda
    rd, ri = reference_topk(x, y, k)
    d, i = d.cpu(), i.cpu()
    if x.dtype == torch.uint8:
        assert d.dtype == torch.int64
        assert torch.equal(d, rd.long()), "uint8 distances differ"
        assert torch.equal(i, ri), "uint8 indices differ"
    else:
        assert d.dtype == torch.float64
        assert torch.equal(i, ri), "indices differ"
        torch.testing.assert_close(d, rd, rtol=1e-6, atol=1e-9)
    # rows are sorted by (dist, idx)
    if k > 1:
        dd = d[:, 1:] - d[:, :-1]
        assert bool((dd >= 0).all())
        ties = dd == 0
        assert bool((i[:, 1:][ties] > i[:, :-1][ties]).all())
    return d, i


def make(dtype, shape, gen, low=0, high=256):
    if dtype == torch.uint8:
        return torch.randint(low, high, shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


DTYPES = [torch.uint8, torch.float32, torch.float64]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setenv("DIFFMEM_KNN_TILE_Q", "37")
    monkeypatch.setenv("DIFFMEM_KNN_TILE_N", "64")


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5, 32])
@pytest.mark.parametrize("shape", [(1, 40, 3), (17, 50, 1), (33, 300, 13), (64, 257, 21)])
def test_random(dtype, k, shape):
    q, n, d = shape
    gen = torch.Generator().manual_seed(1000 * k + 31 * q + 7 * n + d + DTYPES.index(dtype))
    x = make(dtype, (q, d), gen)
    y = make(dtype, (n, d), gen)
    check(x, y, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_n_equals_k(dtype, k):
    gen = torch.Generator().manual_seed(k)
    for q in (1, 5, 20):
        x = make(dtype, (q, 7), gen)
        y = make(dtype, (k, 7), gen)
        check(x, y, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 9, 15, 16, 17, 33, 100])
def test_dims(dtype, d):
    gen = torch.Generator().manual_seed(d)
    x = make(dtype, (23, d), gen)
    y = make(dtype, (150, d), gen)
    check(x, y, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 32])
def test_multi_tile(dtype, k, small_tiles):
    gen = torch.Generator().manual_seed(100 + k)
    x = make(dtype, (100, 19), gen)
    y = make(dtype, (1000, 19), gen)
    check(x, y, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_tiles_several_ref_tiles(dtype):
    # N > default tile size: several ref tiles with the production tiling.
    gen = torch.Generator().manual_seed(7)
    x = make(dtype, (300, 67), gen)
    y = make(dtype, (5000, 67), gen)
    check(x, y, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_exact_duplicates(dtype, k, small_tiles):
    # Many exactly equal refs: ties must be broken by the smaller index,
    # including across tiles.
    gen = torch.Generator().manual_seed(k)
    base = make(dtype, (13, 11), gen)
    pick = torch.randint(0, 13, (700,), generator=gen)
    y = base[pick].clone()
    x = torch.cat([base[:5], make(dtype, (30, 11), gen)])
    check(x, y, k)


@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_uint8_massive_ties(k, small_tiles):
    # Values in {0, 1}: huge numbers of equal distances.
    gen = torch.Generator().manual_seed(k)
    x = make(torch.uint8, (50, 6), gen, 0, 2)
    y = make(torch.uint8, (900, 6), gen, 0, 2)
    check(x, y, k)


def test_uint8_all_equal():
    x = torch.full((20, 10), 200, dtype=torch.uint8)
    y = torch.full((100, 10), 7, dtype=torch.uint8)
    d, i = check(x, y, 32)
    assert torch.equal(i, torch.arange(32).expand(20, 32))


def test_uint8_extremes():
    # Distances near d * 255^2 (beyond 2^31 for d = 40000), 0/255 extremes.
    gen = torch.Generator().manual_seed(3)
    d = 40000
    x = torch.zeros((3, d), dtype=torch.uint8)
    y = torch.full((40, d), 255, dtype=torch.uint8)
    y[5, :7] = 0
    y[9, :7] = 0
    y[11, :3] = 0
    y[20:] = make(torch.uint8, (20, d), gen)
    x[2] = 255
    check(x, y, 8)


def test_uint8_wide_d():
    # d > 66051: 64-bit distance path with a d-chunked GEMM.
    gen = torch.Generator().manual_seed(4)
    d = 70001
    x = make(torch.uint8, (18, d), gen)
    y = make(torch.uint8, (40, d), gen)
    y[3] = x[0]
    y[7] = x[0]
    check(x, y, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_near_duplicates_large_norms(dtype, k, small_tiles):
    # refs = base + tiny noise with base ~ 1000: the GEMM error bound is far
    # wider than the distance gaps (float32 takes the exact fallback).
    gen = torch.Generator().manual_seed(k)
    d = 24
    base = 900 + 200 * torch.rand(d, generator=gen, dtype=torch.float64)
    y = (base + 1e-2 * torch.randn((500, d), generator=gen, dtype=torch.float64)).to(dtype)
    x = (base + 0.5 * torch.randn((40, d), generator=gen, dtype=torch.float64)).to(dtype)
    check(x, y, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_offset(dtype):
    # Everything far from the origin, moderate spread.
    gen = torch.Generator().manual_seed(11)
    x = (1e4 + torch.randn((30, 40), generator=gen, dtype=torch.float64)).to(dtype)
    y = (1e4 + torch.randn((800, 40), generator=gen, dtype=torch.float64)).to(dtype)
    check(x, y, 10)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e25), (torch.float32, 1e-30), (torch.float32, 1e-40),
                                         (torch.float64, 1e150), (torch.float64, 1e-150)])
def test_extreme_magnitudes(dtype, scale):
    # Near the top and the bottom of the dtype's range: products overflow or underflow in
    # the GEMM (on the CPU this needed scaling by a power of two first).
    gen = torch.Generator().manual_seed(7)
    y = torch.randn((300, 500), generator=gen, dtype=torch.float64)
    x = y[:40] + 0.3 * torch.randn((40, 500), generator=gen, dtype=torch.float64)
    x, y = (x * scale).to(dtype), (y * scale).to(dtype)
    d, i = run(x, y, 2)
    rd, ri = reference_topk(x, y, 2)
    assert torch.equal(i.cpu(), ri), "indices differ"
    torch.testing.assert_close(d.cpu(), rd, rtol=1e-6, atol=0.0)  # squared, float64: re-ranked exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_rejects_non_finite_input(dtype, bad):
    # Before the check, inf made the power-of-two scaling loop ~2^31 times.
    gen = torch.Generator().manual_seed(13)
    x, y = make(dtype, (5, 9), gen), make(dtype, (40, 9), gen)
    y[17, 3] = bad
    with pytest.raises(RuntimeError, match="must be finite"):
        run(x, y, 2)


@pytest.mark.parametrize("case", FLOAT64_RANGE_END_CASES)
def test_float64_distances_at_the_ends_of_the_range(case):
    # Squared distances past the float64 range tie at inf, in index order; differences far
    # below the values survive (the re-rank uses the rows as given, not the scaled copies).
    x, y = float64_range_end_rows(case)
    for k in (1, 2, 3):
        d, i = run(x, y, k)
        rd, ri = reference_topk(x, y, k)
        assert torch.equal(i.cpu(), ri), f"k={k}: {i.tolist()} vs {ri.tolist()}"
        torch.testing.assert_close(d.cpu(), rd, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("fallback", [False, True])
def test_same_bits_as_the_cpu_op(fallback, monkeypatch):
    # Exact distances are summed in feature order without fma on both devices, so even
    # rows whose distances tie only up to rounding come back in the same order. Here the
    # two refs are permutations of each other: equal in exact arithmetic, and a different
    # summation order rounds them apart.
    if fallback:
        monkeypatch.setenv("DIFFMEM_KNN_FORCE_FALLBACK", "1")
    x = torch.zeros(1, 3, dtype=torch.float64)
    y = torch.tensor([[2.1924660937882696, 0.7634104416843126, 2.8412850171063746],
                      [0.7634104416843126, 2.1924660937882696, 2.8412850171063746]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(14)
    xr, yr = make(torch.float64, (30, 77), gen), make(torch.float64, (500, 77), gen)
    for a, b, k in ((x, y, 2), (xr, yr, 5), (xr.float(), yr.float(), 5)):
        d, i = run(a, b, k)
        cd, ci = knn_topk(a, b, k)
        assert torch.equal(i.cpu(), ci) and torch.equal(d.cpu(), cd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_forced_fallback(dtype, k, monkeypatch):
    monkeypatch.setenv("DIFFMEM_KNN_FORCE_FALLBACK", "1")
    monkeypatch.setenv("DIFFMEM_KNN_TILE_Q", "13")
    monkeypatch.setenv("DIFFMEM_KNN_TILE_N", "50")
    gen = torch.Generator().manual_seed(k)
    base = make(dtype, (9, 10), gen)
    y = torch.cat([make(dtype, (300, 10), gen), base[torch.randint(0, 9, (100,), generator=gen)]])
    x = torch.cat([base[:3], make(dtype, (40, 10), gen)])
    check(x, y, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, small_tiles):
    gen = torch.Generator().manual_seed(5)
    x = make(dtype, (77, 30), gen, 0, 4)
    y = make(dtype, (600, 30), gen, 0, 4)
    d1, i1 = run(x, y, 32)
    d2, i2 = run(x, y, 32)
    assert torch.equal(d1, d2) and torch.equal(i1, i2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_query_single_ref(dtype):
    gen = torch.Generator().manual_seed(0)
    check(make(dtype, (1, 3), gen), make(dtype, (1, 3), gen), 1)


def test_uint8_moderate_realistic():
    # d = 3072 like the benchmark, several tiles in both directions.
    gen = torch.Generator().manual_seed(12)
    x = make(torch.uint8, (40, 3072), gen)
    y = make(torch.uint8, (2500, 3072), gen)
    y[1234] = x[3]
    check(x, y, 32)


def test_tf32_setting_is_restored():
    # The float32 GEMM must run without TF32 even when the user enabled it,
    # and the user's setting must be restored afterwards.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy TF32 API may warn
        prev = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            gen = torch.Generator().manual_seed(1)
            # large offsets: TF32 products would break the error bound
            x = 1e3 + make(torch.float32, (20, 9), gen)
            y = 1e3 + make(torch.float32, (100, 9), gen)
            check(x, y, 3)
            assert torch.backends.cuda.matmul.allow_tf32
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.parametrize("mode", ["default", "high", "medium", "per-backend-tf32"])
def test_matmul_precision_untouched(mode):
    """The float path runs without TF32 and leaves the user's setting, made with either
    API, as it was (the default one included: TF32 stays off)."""
    try:
        if mode in ("high", "medium"):
            torch.set_float32_matmul_precision(mode)
        elif mode == "per-backend-tf32":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        before = matmul_precision_state()
        gen = torch.Generator().manual_seed(2)
        check(make(torch.float32, (20, 9), gen), make(torch.float32, (100, 9), gen), 3)
        assert matmul_precision_state() == before
    finally:
        reset_matmul_precision()


def test_float32_verified_by_the_bound_with_tf32_on():
    # Small norms: the bound verifies almost every query, so the GEMM's own precision is
    # what decides the candidates (TF32 products would exceed the bound).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_float32_matmul_precision("high")
        try:
            gen = torch.Generator().manual_seed(4)
            check(make(torch.float32, (300, 64), gen), make(torch.float32, (2000, 64), gen), 2)
        finally:
            reset_matmul_precision()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_tiles_narrower_than_k(dtype, monkeypatch):
    monkeypatch.setenv("DIFFMEM_KNN_TILE_N", "8")
    gen = torch.Generator().manual_seed(8)
    check(make(dtype, (30, 11), gen), make(dtype, (200, 11), gen), 32)


def test_uint8_query_tiles_below_the_gemm_minimum(monkeypatch):
    # _int_mm needs more than 16 rows: tiles of 5 queries are padded (with rows of the next tile).
    monkeypatch.setenv("DIFFMEM_KNN_TILE_Q", "5")
    gen = torch.Generator().manual_seed(9)
    check(make(torch.uint8, (23, 40), gen), make(torch.uint8, (300, 40), gen), 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_side_stream(dtype):
    gen = torch.Generator().manual_seed(10)
    x, y = make(dtype, (50, 33), gen), make(dtype, (700, 33), gen)
    xs, ys = x.to(DEVICE), y.to(DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        d, i = knn_topk(xs, ys, 5)
    torch.cuda.current_stream().wait_stream(stream)
    rd, ri = reference_topk(x, y, 5)
    assert torch.equal(i.cpu(), ri)
    if dtype == torch.uint8:
        assert torch.equal(d.cpu(), rd.long())


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_on_views(dtype, monkeypatch):
    """diffmem.knn.topk with the CUDA kernel on views: rows starting one element in, and a
    transposed batch (the wrapper makes them contiguous for the op)."""
    import diffmem.knn

    monkeypatch.setenv("DIFFMEM_CUDA_KNN", "1")

    gen = torch.Generator().manual_seed(11)
    x = make(dtype, (12, 64 + 1), gen)[:, 1:]  # rows start one element in
    y = make(dtype, (64, 300), gen).T  # non-contiguous (300, 64)
    dist, idx = diffmem.knn.topk(x.to(DEVICE), y.to(DEVICE), 3, squared=True)
    rd, ri = reference_topk(x, y, 3)
    assert torch.equal(idx.cpu(), ri)
    if dtype == torch.uint8:
        assert torch.equal(dist.cpu(), rd.long())
    else:
        torch.testing.assert_close(dist.cpu().double(), rd, rtol=1e-6, atol=1e-9)


def test_rejects_bad_input():
    x = torch.zeros((3, 4), dtype=torch.uint8, device=DEVICE)
    y = torch.zeros((5, 4), dtype=torch.uint8, device=DEVICE)
    with pytest.raises(RuntimeError):
        knn_topk(x, y, 6)  # k > N
    with pytest.raises(RuntimeError):
        knn_topk(x, y.float(), 2)  # dtype mismatch
