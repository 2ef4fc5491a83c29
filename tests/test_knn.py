"""diffmem.knn.topk against a float64 brute force, on random and nasty inputs."""
import numpy as np
import pytest
import torch
from helpers import (FLOAT64_RANGE_END_CASES, brute_force_topk, float64_range_end_rows, matmul_precision_state,
                     reset_matmul_precision)

import diffmem
from diffmem import knn

SHAPES = [  # Q, N, d, k: tiny, odd row sizes, N == k, several tiles, d past 2^31 / 255^2
    (1, 1, 1, 1),
    (1, 5, 3, 5),
    (7, 9, 13, 2),
    (37, 101, 97, 5),
    (50, 300, 3072, 2),
    (9, 60, 1027, 32),
    (130, 1100, 67, 3),
    (1030, 150, 16, 2),
    (4, 40, 40000, 2),
]


def _rand_u8(gen, *shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _assert_exact_u8(x, y, k, **kw):
    sq, idx = knn.topk(x, y, k, squared=True, **kw)
    ref_d, ref_i = brute_force_topk(x, y, k)
    assert sq.dtype == torch.int64 and idx.dtype == torch.int64
    assert torch.equal(sq, ref_d.long()), "squared distances differ from the brute force"
    assert torch.equal(idx, ref_i), "indices differ from the brute force"


@pytest.mark.parametrize("Q,N,d,k", SHAPES)
def test_uint8_random_exact(backend, Q, N, d, k):
    gen = torch.Generator().manual_seed(Q * 7919 + N * 31 + d)
    _assert_exact_u8(_rand_u8(gen, Q, d), _rand_u8(gen, N, d), k)


def test_uint8_extreme_values_and_duplicates(backend):
    """Pixels at 0 and 255 (largest products), exact duplicate refs (ties broken by
    the smaller index) and queries that equal refs (distance 0)."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (64, 3072), dtype=torch.uint8, generator=gen) * 255
    y[10] = y[3]
    y[40] = y[3]
    y[41] = y[20]
    x = torch.cat([y[[3, 20, 41, 0]], 255 - y[:5], torch.full((1, 3072), 128, dtype=torch.uint8)])
    _assert_exact_u8(x, y, 4)
    sq, idx = knn.topk(x, y, 3, squared=True)
    assert idx[0].tolist() == [3, 10, 40] and sq[0].tolist() == [0, 0, 0]
    assert idx[1].tolist()[:2] == [20, 41] and idx[2].tolist()[:2] == [20, 41]


@pytest.mark.parametrize("d", [65792, 65793])  # the blocked kernels' largest rows, and one more
def test_uint8_largest_rows_with_extreme_pixels(backend, d):
    """Rows of 0s and 255s give the largest products (|x - 128| |y - 128| = 2^14) in every
    feature: the blocked kernels' int32 accumulators and per-slice float32 sums (AVX2) stay
    exact up to d = 65792; longer rows take the portable kernel."""
    gen = torch.Generator().manual_seed(d)
    y = torch.randint(0, 2, (6, d), dtype=torch.uint8, generator=gen) * 255
    y[0] = 0
    y[1] = 255
    x = torch.stack([torch.zeros(d, dtype=torch.uint8), torch.full((d,), 255, dtype=torch.uint8), 255 - y[2]])
    _assert_exact_u8(x, y, 3)


def test_uint8_all_refs_equal(backend):
    """Every distance ties: the k smallest indices must come back."""
    y = torch.full((100, 50), 7, dtype=torch.uint8)
    x = torch.full((3, 50), 9, dtype=torch.uint8)
    sq, idx = knn.topk(x, y, 5, squared=True)
    assert idx.tolist() == [list(range(5))] * 3
    assert (sq == 4 * 50).all()


def test_uint8_noncontiguous_and_images(backend):
    gen = torch.Generator().manual_seed(2)
    imgs = _rand_u8(gen, 80, 3, 8, 8)
    x = _rand_u8(gen, 20, 8, 8, 3).permute(0, 3, 1, 2)  # channels-last view: not contiguous
    assert not x.is_contiguous()
    _assert_exact_u8(x, imgs, 2)
    _assert_exact_u8(x[::2], imgs[1::3], 3)


def _near_duplicates(gen, dtype, Q=40, N=400, d=777, scale=1000.0, noise=1e-3):
    """Refs scattered around a few large-norm centres; queries a hair away from a ref.
    The GEMM expansion cancels catastrophically here (distances ~1e-6 of the norms)."""
    centres = torch.randn(4, d, dtype=torch.float64, generator=gen) * scale
    y = centres[torch.randint(0, 4, (N,), generator=gen)] + torch.randn(N, d, dtype=torch.float64, generator=gen) * noise
    pick = torch.randint(0, N, (Q,), generator=gen)
    x = y[pick] + torch.randn(Q, d, dtype=torch.float64, generator=gen) * noise * 0.3
    return x.to(dtype), y.to(dtype)


def _assert_float_matches(x, y, k, rtol=1e-6):
    dist, idx = knn.topk(x, y, k)
    ref_d, ref_i = brute_force_topk(x, y, k)
    assert dist.dtype == (torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32)
    assert torch.equal(idx, ref_i), "indices differ from the float64 brute force"
    torch.testing.assert_close(dist.double(), ref_d.sqrt(), rtol=rtol, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Q,N,d,k", SHAPES[:-1])
def test_float_random(backend, dtype, Q, N, d, k):
    gen = torch.Generator().manual_seed(Q + N + d)
    x = torch.randn(Q, d, generator=gen).to(dtype)
    y = torch.randn(N, d, generator=gen).to(dtype)
    _assert_float_matches(x, y, k)


REDUCED_PRECISION_SETTINGS = {
    "legacy-high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy-medium": lambda: torch.set_float32_matmul_precision("medium"),  # bf16 on the CPU
    "per-backend-cuda-tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "per-backend-cpu-bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


@pytest.fixture(params=sorted(REDUCED_PRECISION_SETTINGS))
def reduced_matmul_precision(request):
    """A user's reduced float32 matmul precision, set with either API; the default after."""
    REDUCED_PRECISION_SETTINGS[request.param]()
    yield request.param
    reset_matmul_precision()
    assert matmul_precision_state() == ("none", "none", "highest")


def test_float_exact_whatever_matmul_precision_the_user_set(backend, reduced_matmul_precision):
    """Exact under TF32/bf16 settings made with the legacy or the per-backend API (the
    legacy getter raises for the latter), and the user's setting is left as it was."""
    before = matmul_precision_state()
    x, y = _near_duplicates(torch.Generator().manual_seed(5), torch.float32, Q=24, N=300, d=200)
    _assert_float_matches(x, y, 3)
    assert matmul_precision_state() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_near_duplicates_large_norms(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    x, y = _near_duplicates(gen, dtype)
    _assert_float_matches(x, y, 2)
    # The expansion alone (what cdist does) gets these wrong: the test is not vacuous.
    expanded = torch.cdist(x.float(), y.float(), compute_mode="use_mm_for_euclid_dist")
    assert not torch.equal(expanded.topk(2, largest=False).indices, brute_force_topk(x, y, 2)[1])


def test_float64_differences_below_float32_resolution(backend):
    """float64 near-duplicates a millionth of a float32 ulp apart, around large centres: the
    bfloat16 and float32 roundings of the rows erase them, so only the bound (taken from the
    float64 rows) and the fallbacks behind it can find the nearest."""
    gen = torch.Generator().manual_seed(8)
    x, y = _near_duplicates(gen, torch.float64, scale=1000.0, noise=1e-9)
    _assert_float_matches(x, y, 2, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_exact_ties(backend, dtype):
    """Refs at the same distance from a query (mirror images, duplicates): smaller index first."""
    base = torch.zeros(1, 16, dtype=dtype)
    e = torch.eye(16, dtype=dtype)
    y = torch.cat([e * 3, -e * 3, e * 3, torch.ones(1, 16, dtype=dtype) * 100])
    sq, idx = knn.topk(base, y, 32, squared=True)
    assert idx[0].tolist() == list(range(32)) and (sq == 9).all()


def test_float_masses_of_near_ties(backend):
    """More near-equidistant refs than the candidate list holds: the brute-force
    fallback must still return the exact order."""
    gen = torch.Generator().manual_seed(4)
    d = 64
    y = torch.randn(2000, d, generator=gen, dtype=torch.float64)
    y = 1e4 * y / y.norm(dim=1, keepdim=True)  # all on a sphere of radius 1e4
    y = y + torch.randn(2000, d, generator=gen, dtype=torch.float64) * 1e-9
    x = torch.zeros(3, d, dtype=torch.float64)
    x[1, 0] = 1e-6
    _assert_float_matches(x.float(), y.float(), 5, rtol=1e-6)
    _assert_float_matches(x, y, 5, rtol=1e-12)


def test_float32_screen_overflow_falls_back_to_a_tighter_screen(backend):
    """Refs on spheres around queries far from the refs' centre, radii 0.05 apart: within
    the bfloat16 screen's bound all 100 refs of a sphere tie (more than the candidate list
    holds), while the float32 screen separates them. The result must not depend on which
    screen found it."""
    gen = torch.Generator().manual_seed(6)
    d = 64
    q = torch.randn(3, d, generator=gen, dtype=torch.float64) * 10
    u = torch.randn(300, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    radii = 1 + (torch.arange(300, dtype=torch.float64) % 100) * 0.05
    y = q.repeat_interleave(100, dim=0) + u * radii[:, None]
    y = y[torch.randperm(300, generator=gen)]
    _assert_float_matches(q.float(), y.float(), 5)
    if backend == "reference":
        return
    # ... and the case is what it claims: the bfloat16 screen overflows, the float32 one not
    counts = torch.ops.diffmem.knn_screen_counts(q.float(), y.float(), 5)
    if "bf16-screen" in diffmem._native.cpu_kernels():
        assert (counts == -1).all()
    else:
        assert ((counts >= 5) & (counts <= 64)).all()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e25), (torch.float32, 1e-30), (torch.float32, 1e-40),
                                         (torch.float64, 1e150), (torch.float64, 1e-150)])
def test_float_extreme_magnitudes(backend, dtype, scale):
    """Rows near the top and the bottom of the dtype's range (1e-40 is subnormal in
    float32): the screens' products would overflow or underflow there, so the rows are
    scaled by a power of two first, and the result is still the brute force's."""
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(300, 500, generator=gen, dtype=torch.float64)
    x = y[:40] + torch.randn(40, 500, generator=gen, dtype=torch.float64) * 0.3
    x, y = (x * scale).to(dtype), (y * scale).to(dtype)
    dist, idx = knn.topk(x, y, 2)
    ref_d, ref_i = brute_force_topk(x, y, 2)
    assert torch.equal(idx, ref_i), "indices differ from the float64 brute force"
    # subnormal float32 distances keep few significant bits: compare at the output's resolution
    atol = 2.0 ** -149 if scale < 1e-38 else 0.0
    torch.testing.assert_close(dist.double(), ref_d.sqrt(), rtol=1e-6, atol=atol)


@pytest.mark.parametrize("case", FLOAT64_RANGE_END_CASES)
def test_float64_distances_at_the_ends_of_the_range(backend, case):
    """Squared distances past the float64 range tie at inf, in index order, as in a float64
    brute force (no empty slot is left with index -1); differences far below the values
    survive (the re-rank uses the rows as given, not the screen's scaled copies)."""
    x, y = float64_range_end_rows(case)
    for k in (1, 2, 3):
        dist, idx = knn.topk(x, y, k)
        ref_d, ref_i = brute_force_topk(x, y, k)
        assert torch.equal(idx, ref_i), f"k={k}: indices {idx.tolist()} differ from {ref_i.tolist()}"
        torch.testing.assert_close(dist, ref_d.sqrt(), rtol=1e-12, atol=0.0)


def test_float_rows_too_long_for_low_precision_bounds(backend):
    """2^23 + 8 features a row: d u >= 1 for bfloat16 products (and 2^21 is the float32
    limit), where gamma_d no longer bounds the sums; such rows take float64 products."""
    gen = torch.Generator().manual_seed(11)
    d = 2**23 + 8
    y = torch.randn(3, d, generator=gen)
    x = (y[1:2] + torch.randn(1, d, generator=gen) * 1e-3).float()
    y[2] = y[1] + torch.randn(d, generator=gen) * 1e-3  # a second ref as near as the first
    _assert_float_matches(x, y, 2)


def test_bf16_screen_is_the_default_where_the_cpu_has_it(monkeypatch):
    from bench.machine import cpu_flags

    monkeypatch.delenv("DIFFMEM_CPU_KERNEL", raising=False)
    kernels = diffmem._native.cpu_kernels()
    if {"avx512f", "avx512_bf16"} <= cpu_flags():
        assert "float32:avx512-bf16-screen" in kernels
    else:
        assert "bf16" not in kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 100, generator=gen).to(dtype)
    y = torch.randn(300, 100, generator=gen).to(dtype)
    _assert_float_matches(x, y, 3)


def test_numpy_input(backend):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (15, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (90, 4, 4, 3), dtype=np.uint8)
    _assert_exact_u8(torch.from_numpy(x), torch.from_numpy(y), 2)
    sq, idx = knn.topk(x, y, 2, squared=True)
    ref_d, ref_i = brute_force_topk(torch.from_numpy(x), torch.from_numpy(y), 2)
    assert torch.equal(idx, ref_i) and torch.equal(sq, ref_d.long())
    dist, idx = knn.topk(x.astype(np.float32) / 255, y.astype(np.float32) / 255, 2)
    assert dist.dtype == torch.float32 and torch.equal(idx, ref_i)


def test_memmap_is_streamed(backend, tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 256, (1000, 3, 8, 8), dtype=np.uint8)
    x = rng.integers(0, 256, (25, 3, 8, 8), dtype=np.uint8)
    x[:5] = y[[999, 0, 500, 501, 250]]
    path = tmp_path / "refs.u8"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=y.shape)
    mm[:] = y
    mm.flush()
    ro = np.memmap(path, dtype=np.uint8, mode="r", shape=y.shape)
    monkeypatch.setattr(knn, "STREAM_BYTES", 192 * 64 + 5)  # 64 rows a chunk: 16 chunks
    sq, idx = knn.topk(x, ro, 3, squared=True)
    ref_d, ref_i = brute_force_topk(torch.from_numpy(x), torch.from_numpy(y), 3)
    assert torch.equal(idx, ref_i) and torch.equal(sq, ref_d.long())
    assert idx[:5, 0].tolist() == [999, 0, 500, 501, 250]


def test_chunk_iterable_with_ties_across_chunks(backend):
    gen = torch.Generator().manual_seed(8)
    y = _rand_u8(gen, 300, 50)
    y[250] = y[7]  # the same image in two chunks: the earlier global index wins
    y[120] = y[7]
    x = torch.cat([y[[7, 120, 250]], _rand_u8(gen, 10, 50)])
    chunks = (y[s : s + 64] for s in range(0, 300, 64))  # a generator, sizes 64 ... 44
    sq, idx = knn.topk(x, chunks, 4, squared=True)
    ref_d, ref_i = brute_force_topk(x, y, 4)
    assert torch.equal(idx, ref_i) and torch.equal(sq, ref_d.long())
    assert idx[:3, :3].tolist() == [[7, 120, 250]] * 3
    # Float chunks of different sizes, numpy and torch mixed, k larger than a chunk.
    xf, yf = x.float(), y.float()
    parts = [yf[:3].numpy(), yf[3:200], yf[200:]]
    dist, idx = knn.topk(xf, parts, 5)
    ref_d, ref_i = brute_force_topk(xf, yf, 5)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d.sqrt(), rtol=1e-6, atol=0)


def test_returns_euclidean_distances(backend):
    x = torch.tensor([[0, 0]], dtype=torch.uint8)
    y = torch.tensor([[3, 4], [6, 8], [1, 0]], dtype=torch.uint8)
    dist, idx = knn.topk(x, y, 3)
    assert dist.dtype == torch.float32
    assert dist.tolist() == [[1.0, 5.0, 10.0]] and idx.tolist() == [[2, 0, 1]]
    dist64, _ = knn.topk(x.double(), y.double(), 2)
    assert dist64.dtype == torch.float64 and dist64.tolist() == [[1.0, 5.0]]


BAD_INPUTS = [
    (lambda: knn.topk(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8), 3), "larger than"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(5, 3), 0), "between 1 and 32"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(50, 3), 33), "between 1 and 32"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(5, 3), 2.0), "integer"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(5, 4), 2), "row sizes differ"),
    (lambda: knn.topk(torch.zeros(0, 3), torch.zeros(5, 3), 2), "queries is empty"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(0, 3), 2), "refs is empty"),
    (lambda: knn.topk(torch.zeros(2, 3), [], 2), "refs is empty"),
    (lambda: knn.topk(torch.zeros(2, 0), torch.zeros(5, 0), 2), "rows are empty"),
    (lambda: knn.topk(torch.tensor([[0.0, float("nan")]]), torch.zeros(5, 2), 2), "NaN or inf"),
    (lambda: knn.topk(torch.zeros(1, 2), torch.tensor([[float("inf"), 0.0]] * 3), 2), "NaN or inf"),
    (lambda: knn.topk(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(5, 3, dtype=torch.int32), 2), "dtype"),
    (lambda: knn.topk(np.zeros((2, 3), dtype=object), np.zeros((5, 3)), 2), "dtype"),
    (lambda: knn.topk(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(5, 3), 2), "same dtype"),
    (lambda: knn.topk(torch.zeros(2, 3), torch.zeros(5, 3, device="meta"), 2), "device"),
    (lambda: knn.topk(torch.zeros(3), torch.zeros(5, 3), 2), "1-D"),
    (lambda: knn.topk("abc", torch.zeros(5, 3), 2), "tensor or numpy"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_opcheck(dtype):
    assert diffmem._native.AVAILABLE, diffmem._native.LOAD_ERROR
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (11, 37), generator=gen).to(dtype)
    y = torch.randint(0, 256, (53, 37), generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.diffmem.knn_topk.default, (x, y, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_screen_counts(dtype):
    assert diffmem._native.AVAILABLE, diffmem._native.LOAD_ERROR
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(11, 37, generator=gen).to(dtype)
    y = torch.randn(53, 37, generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.diffmem.knn_screen_counts.default, (x, y, 3))
    counts = torch.ops.diffmem.knn_screen_counts(x, y, 3)
    assert counts.shape == (11,) and ((counts >= 3) | (counts == -1)).all()  # the k nearest are always kept
    with pytest.raises(ValueError, match="uint8 search has no screen"):
        torch.ops.diffmem.knn_screen_counts(x.to(torch.uint8), y.to(torch.uint8), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["queries", "refs-first", "refs-last"])
def test_op_rejects_non_finite_input(dtype, bad, where):
    # The op itself (not only the Python wrapper) refuses NaN/inf: the power-of-two scaling
    # would otherwise zero every row (inf) or ignore the value (NaN) and return index -1.
    assert diffmem._native.AVAILABLE, diffmem._native.LOAD_ERROR
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 37, generator=gen).to(dtype)
    y = torch.randn(40, 37, generator=gen).to(dtype)
    if where == "queries":
        x[2, 5] = bad
    elif where == "refs-first":
        y[0, 0] = bad
    else:
        y[-1, -1] = bad  # past the last full vector of lanes
    for op in (torch.ops.diffmem.knn_topk, torch.ops.diffmem.knn_screen_counts):
        with pytest.raises(RuntimeError, match="must be finite"):
            op(x, y, 2)


def test_under_torch_compile():
    assert diffmem._native.AVAILABLE, diffmem._native.LOAD_ERROR
    gen = torch.Generator().manual_seed(10)
    x = torch.randint(0, 256, (8, 30), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 256, (40, 30), generator=gen, dtype=torch.uint8)
    fn = torch.compile(lambda a, b: torch.ops.diffmem.knn_topk(a, b, 2), fullgraph=True, backend="eager")
    got = fn(x, y)
    want = brute_force_topk(x, y, 2)
    assert torch.equal(got[0], want[0].long()) and torch.equal(got[1], want[1])
