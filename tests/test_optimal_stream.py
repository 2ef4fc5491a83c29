"""The tensor-core streaming implementation of diffmem::optimal_denoise
(diffmem/optimal_stream.py), run on the CPU with its float16 GEMMs emulated (a float32
product of the same float16 operands: exact product by product), against the independent
dense float64 implementation of test_optimal.py. On CUDA the same code is the op's CUDA
kernel; tests/test_optimal_cuda.py runs it there.
"""
import math
import pathlib
import warnings

import pytest
import torch

import diffmem
from diffmem import optimal_stream as stream
from test_optimal import (LSE_ATOL32, SIGMAS, TOL, as_rows64, dense_denoise, dense_logits, query_cases, rel_err,
                          training_set)
from test_optimal_cuda import _separated_images, int8_product_errors, product_error_ratios

GRID = SIGMAS + [0.3, 3.0, 5.0, 20.0, 40.0]


def run(x, train, sigma, scale=1.0, labels=None, train_labels=None):
    B = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B).contiguous()
    m = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(B).contiguous()
    return stream.optimal_denoise(x, train, sig, m, labels, train_labels, 0)


def train_of(kind):
    train, gen = training_set("uint8" if kind == "uint8" else "float32")
    return (train.bfloat16() if kind == "bfloat16" else train), gen


def assert_accurate(D, lse, ref, ref_lse, what):
    assert D.dtype == torch.float32 and lse.dtype == torch.float64
    assert rel_err(D, ref) <= TOL, f"{what}: relative error {rel_err(D, ref):.2e}"
    # lse: the logit budget plus float64 roundoff of logits that reach 1e9 (as test_optimal)
    assert ((lse - ref_lse).abs() - 1e-9 * ref_lse.abs()).max() <= LSE_ATOL32, what


@pytest.mark.parametrize("kind", ["uint8", "float32", "bfloat16"])
def test_accuracy_near_ties_and_far(kind):
    train, gen = train_of(kind)
    y = as_rows64(train)
    for sigma in GRID:
        x = query_cases(y, gen, sigma)
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"{kind} sigma={sigma}")


def test_plain_float16_products_would_fail(monkeypatch):
    """The check above can fail: without the second float16 term of x and of float32 rows
    (one GEMM instead of three) the same computation misses the budget."""
    monkeypatch.setattr(stream, "split_f16", lambda v: (v.half(), torch.zeros_like(v.half())))
    assert worst_error("float32", (1.0, 3.0, 20.0)) > TOL


def test_one_int8_term_would_fail(monkeypatch):
    """uint8 rows: with x's int8 terms after the first zeroed (their error unreported), the
    same computation misses the budget: the int8 products are what makes it accurate."""
    terms = stream.int8_terms

    def first_term_only(xd, rows_out, cols_out):
        q, c, rel = terms(xd, rows_out, cols_out)
        q[1:] = 0
        return q, c, rel

    monkeypatch.setattr(stream, "int8_terms", first_term_only)
    assert worst_error("uint8", (1.0, 3.0, 20.0)) > TOL


def test_without_int8_products_uint8_rows_take_the_float16_path(monkeypatch):
    """A device whose torch._int_mm fails is found out once, with a warning, and uint8 rows
    then go the float16 way, as accurate (the int8 products would raise if called)."""
    def unsupported(a, b):
        raise RuntimeError("_int_mm: not supported on this device\n(details)")

    monkeypatch.setattr(torch, "_int_mm", unsupported)
    monkeypatch.setattr(stream, "_INT8_WORKS", {})
    with pytest.warns(UserWarning, match="int8 products unavailable on cpu .*not supported on this device"):
        assert stream.int8_works(torch.device("cpu")) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found out once: no warning per call
        assert worst_error("uint8", (0.01, 1.0, 20.0)) <= TOL


def test_int8_probe_passes_here():
    assert stream.int8_works(torch.device("cpu")) is True


def worst_error(kind, sigmas):
    train, gen = train_of(kind)
    y = as_rows64(train)
    worst = 0.0
    for sigma in sigmas:
        x = query_cases(y, gen, sigma)
        ref, _ = dense_denoise(x, sigma, train)
        D, _ = run(x, train, sigma)
        worst = max(worst, rel_err(D, ref))
    return worst


# Escalation ladders forced one way: float32 rows take the float16 tiers (ESCALATE: one
# term, two, blocked, float64), uint8 rows the int8 ones (ESCALATE_INT8: two terms, three,
# float64)
TIERS = {"exact-only": (math.inf, math.inf, math.inf), "two-terms-always": (-1.0, math.inf, math.inf),
         "blocked-always": (-1.0, -1.0, math.inf), "dense-always": (-1.0, -1.0, -1.0)}
INT8_TIERS = {"int8-exact-only": (math.inf, math.inf), "int8-three-terms-always": (-1.0, math.inf),
              "int8-dense-always": (-1.0, -1.0)}


def force_ladder(monkeypatch, path: str) -> str:
    """Sets the ladder `path` and returns the kind of rows that takes it."""
    if path in INT8_TIERS:
        monkeypatch.setattr(stream, "ESCALATE_INT8", INT8_TIERS[path])
        return "uint8"
    monkeypatch.setattr(stream, "ESCALATE", TIERS[path])
    monkeypatch.setattr(stream, "FIRST_TIER", 0 if path == "exact-only" else 1)
    return "float32"


@pytest.mark.parametrize("path", list(TIERS) + list(INT8_TIERS))
def test_every_precision_tier_is_accurate(path, monkeypatch):
    """Direct differences for every inexact item at the first tier (one float16 term, two
    int8 terms), or every chunk at two float16 terms, at the blocked products, at three
    int8 terms, or at the float64 GEMM."""
    train, gen = train_of(force_ladder(monkeypatch, path))
    y = as_rows64(train)
    for sigma in (0.002, 0.3, 3.0, 80.0):
        x = query_cases(y, gen, sigma)
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"{path} sigma={sigma}")


def test_direct_differences_are_used_at_small_sigma(monkeypatch):
    calls = []
    original = stream.pair_logits
    monkeypatch.setattr(stream, "pair_logits", lambda *a: calls.append(a[2].numel()) or original(*a))
    train, gen = train_of("uint8")
    x = query_cases(as_rows64(train), gen, 0.002)
    run(x, train, 0.002)
    assert calls and sum(calls) < x.shape[0] * train.shape[0] / 16  # a few items per query
    calls.clear()
    run(query_cases(as_rows64(train), gen, 80.0), train, 80.0)
    assert not calls  # at large sigma every expansion logit is accurate enough


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_chunks_and_uneven_tail(kind, monkeypatch):
    """Many chunks (the last one partial) give the result of one chunk."""
    train, gen = train_of(kind)
    y = as_rows64(train)
    x = query_cases(y, gen, 0.5)
    one, lse_one = run(x, train, 0.5)
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: 37)
    many, lse_many = run(x, train, 0.5)
    ref, ref_lse = dense_denoise(x, 0.5, train)
    assert_accurate(many, lse_many, ref, ref_lse, "37-row chunks")
    assert rel_err(many, one.double()) <= 2 * TOL


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_few_items_matter_one_term_and_active_rows(kind, monkeypatch):
    """Small sigma over several chunks: the logits take the first tier (float rows: after
    the first chunk, one float16 term; uint8 rows: two int8 terms, one GEMM, throughout),
    the weighted sums multiply only the few rows that some query weighs, and the result
    stays within the budget."""
    d, rows = 3072, 1000
    calls = {"logit_gemms": 0, "int8_logit_gemms": 0, "narrow_weight_gemms": 0, "weighted_sums": 0}
    mm, int_mm, weighted_sum = stream.mm_f16_f32, stream.mm_i8_i32, stream.weighted_sum

    def counted_mm(a, b, acc=None):
        if a.shape[1] == d:  # x's terms (B, d) @ rows.T
            calls["logit_gemms"] += 1
        elif a.shape[1] < rows // 2:  # weights (B, active rows) @ rows
            calls["narrow_weight_gemms"] += 1
        return mm(a, b, acc)

    def counted_int_mm(a, b):
        calls["int8_logit_gemms"] += 1
        return int_mm(a, b)

    def counted_weighted_sum(*args):
        calls["weighted_sums"] += 1
        return weighted_sum(*args)

    monkeypatch.setattr(stream, "mm_f16_f32", counted_mm)
    monkeypatch.setattr(stream, "mm_i8_i32", counted_int_mm)
    monkeypatch.setattr(stream, "weighted_sum", counted_weighted_sum)
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: rows)
    train, gen = training_set(kind, N=4 * rows, d=d, seed=3)
    y = as_rows64(train)
    for sigma in (0.002, 0.05, 0.3):
        calls.update(logit_gemms=0, int8_logit_gemms=0, narrow_weight_gemms=0, weighted_sums=0)
        x = query_cases(y, gen, sigma)
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"{kind} sigma={sigma}")
        if kind == "uint8":  # one int8 GEMM (two terms stacked) per chunk
            assert calls["logit_gemms"] == 0 and calls["int8_logit_gemms"] == 4, f"sigma={sigma}: {calls}"
        else:  # chunks 1 and 2 (queued before chunk 1's verdict) at two terms (3 GEMMs), 3 and 4 at one
            assert calls["logit_gemms"] == 2 * 3 + 2 and calls["int8_logit_gemms"] == 0, f"sigma={sigma}: {calls}"
        # per chunk with weights, the weights over the few rows that matter, and once at the
        # end the rounding residuals of the items holding a sizeable share, all narrow
        terms = 1 if kind == "uint8" else 2
        assert 1 <= calls["weighted_sums"] <= 4, f"sigma={sigma}: {calls}"
        assert calls["narrow_weight_gemms"] == terms * (calls["weighted_sums"] + 1), f"sigma={sigma}: {calls}"


def test_aligned_weight_rounding_is_compensated():
    """One image and 256 copies of another, the query between them and sigma such that the
    copies' float16 weights sit just under a rounding midpoint: all 256 round the same way.
    Uncompensated, that costs D up to 2^-11 ||y_1 - y_2|| / ||D|| (2.5e-4 measured) and the
    log-sum-exp up to 2^-11 (4.9e-4); with the residuals of the heavy items multiplied and
    the exact weights summed for the log-sum-exp, far less."""
    gen = torch.Generator().manual_seed(0)
    d, copies = 256, 256
    y1 = torch.randint(0, 256, (1, d), generator=gen, dtype=torch.uint8)
    y2 = torch.randint(0, 256, (1, d), generator=gen, dtype=torch.uint8)
    train = torch.cat([y1, y2.repeat(copies, 1)])
    y = as_rows64(train)
    dist2 = float(((y[0] - y[1]) ** 2).sum())
    t = 0.45
    x = (y[0] + t * (y[1] - y[0])).float()[None]
    worst_d = worst_lse = 0.0
    for frac in torch.linspace(0.40, 0.4999, 25).tolist():
        r = (2**7 + frac * 2**-3) / 2**15  # a copy's weight relative to y1's: just under a float16 midpoint
        sigma = math.sqrt(-(1 - 2 * t) * dist2 / (2 * math.log(r)))
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        worst_d = max(worst_d, rel_err(D, ref))
        worst_lse = max(worst_lse, float((lse.double() - ref_lse).abs().max()))
    assert worst_d <= 5e-5 and worst_lse <= 5e-5, (worst_d, worst_lse)


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_residuals_are_multiplied_for_the_items_heavy_in_the_final_weight(kind, monkeypatch):
    """Over many chunks, the pairs whose rounding residuals are multiplied at the end are
    exactly those holding >= 1/1024 of their query's final weight (by the float64 reference,
    pairs within 1e-9 of the threshold aside), and no more than 1024 a query are ever kept."""
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: 37)
    kept, final = [], {}
    add_chunk, add_residuals = stream.HeavyItems.add_chunk, stream.add_weight_residuals

    def counted_add_chunk(self, *args):
        add_chunk(self, *args)
        kept.append(int(torch.bincount(self.q, minlength=1).max()) if self.q.numel() else 0)

    def captured(acc, run_sum, heavy, rows, block):
        final["pairs"] = set(zip(heavy.q.tolist(), heavy.n.tolist()))
        assert block == 37  # the residuals' product, in blocks of a chunk's rows
        return add_residuals(acc, run_sum, heavy, rows, block)

    monkeypatch.setattr(stream.HeavyItems, "add_chunk", counted_add_chunk)
    monkeypatch.setattr(stream, "add_weight_residuals", captured)
    train, gen = train_of(kind)
    y = as_rows64(train)
    for sigma in (0.3, 3.0, 20.0):
        x = query_cases(y, gen, sigma)
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"{kind} sigma={sigma}")
        logits, *_ = dense_logits(x, sigma, y, 1.0)
        share = torch.softmax(logits, 1) * stream.HEAVY_SHARE
        sure = {(q, n) for q, n in zip(*torch.nonzero(share >= 1 + 1e-9, as_tuple=True)) for q, n in [(int(q), int(n))]}
        maybe = {(q, n) for q, n in zip(*torch.nonzero(share >= 1 - 1e-9, as_tuple=True)) for q, n in [(int(q), int(n))]}
        assert sure and sure <= final["pairs"] <= maybe, f"{kind} sigma={sigma}"
        assert max(kept) <= stream.HEAVY_SHARE
        kept.clear()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("density", [0.001, 0.5])
def test_weighted_sum_of_active_rows_equals_the_dense_product(split, density):
    gen = torch.Generator().manual_seed(12)
    w = (torch.rand(9, 400, generator=gen) * 2**15).half()
    w[torch.rand(9, 400, generator=gen) > density] = 0
    rows = torch.rand(400, 33, generator=gen, dtype=torch.float64) * 256 - 128
    hi, lo = stream.split_f16(rows) if split else (rows.round().half(), None)
    acc = torch.randn(9, 33, generator=gen)
    dense = stream.mm_f16_f32(w, hi, acc.clone())
    dense = dense if lo is None else stream.mm_f16_f32(w, lo, dense)
    out = stream.weighted_sum(acc.clone(), w, hi, lo, int(w.ne(0).sum()))
    scale = w.float().abs() @ (hi.float().abs() if lo is None else (hi.float() + lo.float()).abs())
    assert ((out - dense).abs() <= 1e-6 * (scale + acc.abs())).all()  # float32 summation order


def test_class_conditional_with_chunks_lacking_a_label(monkeypatch):
    """Sorted labels and small chunks: most chunks have no item of a query's class."""
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: 16)
    gen = torch.Generator().manual_seed(4)
    N, d, B = 90, 64, 12
    train = torch.rand(N, d, generator=gen) * 2 - 1
    tl = torch.arange(N) * 3 // N  # 0..0 1..1 2..2
    lab = torch.arange(B) % 3
    x = (train[torch.arange(B) * 7].double() + 0.4 * torch.randn(B, d, generator=gen, dtype=torch.float64)).float()
    for sigma in (0.05, 0.5, 5.0):
        D, lse = run(x, train, sigma, labels=lab, train_labels=tl)
        ref, ref_lse = dense_denoise(x, sigma, train, mask=lab[:, None] == tl[None])
        assert_accurate(D, lse, ref, ref_lse, f"sigma={sigma}")


def test_per_query_sigma_and_vp_scale():
    train, gen = train_of("uint8")
    y = as_rows64(train)
    B = 16
    sigma = torch.logspace(-2.5, 1.5, B, dtype=torch.float64)
    m = torch.linspace(0.3, 1.0, B, dtype=torch.float64)
    x = (m[:, None] * y[:B] + sigma[:, None] * torch.randn(B, y.shape[1], generator=gen, dtype=torch.float64)).float()
    D, lse = run(x, train, sigma, m)
    ref, ref_lse = dense_denoise(x, sigma, train, m)
    assert_accurate(D, lse, ref, ref_lse, "per-query sigma and scale")


def test_large_and_tiny_query_magnitudes():
    """The power-of-two scaling before the float16 split: |x| far above float16's range
    (65504) and far below its normal range."""
    train, gen = train_of("float32")
    y = as_rows64(train)
    for sigma, amplitude in ((2e4, 1.0), (1e-3, 1.0)):
        x = (y[:6] + sigma * torch.randn(6, y.shape[1], generator=gen, dtype=torch.float64)).float()
        D, lse = run(x * amplitude, train, sigma)
        ref, ref_lse = dense_denoise(x * amplitude, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"sigma={sigma}")
    small = (train[:40] * 1e-6).contiguous()  # rows of tiny norm
    xs = (small[:4].double() + 1e-7 * torch.randn(4, y.shape[1], generator=gen, dtype=torch.float64)).float()
    D, lse = run(xs, small, 1e-7)
    ref, ref_lse = dense_denoise(xs, 1e-7, small)
    assert rel_err(D, ref) <= TOL


def test_nan_in_train_and_unsupported_inputs():
    train, _ = train_of("float32")
    bad = train.clone()
    bad[5, 7] = float("nan")
    x = train[:2].clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        run(x, bad, 1.0)
    bad8 = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="topk=0"):
        stream.optimal_denoise(x[:, :4].double(), bad8, torch.ones(2, dtype=torch.float64),
                               torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("tiers", list(TIERS) + list(INT8_TIERS))
def test_compiled_stages_equal_eager(monkeypatch, tiers):
    """The fused (torch.compile) form of the stages, the default on CUDA, computes what the
    eager one does at every precision tier and sigma."""
    train, gen = train_of(force_ladder(monkeypatch, tiers))
    train = train[:64, :190].contiguous()  # 190: int8 rows padded to 192 features
    y = as_rows64(train)
    cases = [(sigma, query_cases(y, gen, sigma)) for sigma in (0.002, 0.3, 3.0, 80.0)]
    eager = [run(x, train, sigma) for sigma, x in cases]
    monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "1")
    monkeypatch.setattr(stream, "_COMPILED", None)
    for (sigma, x), (D_eager, lse_eager) in zip(cases, eager):
        D, lse = run(x, train, sigma)
        assert rel_err(D, D_eager.double()) <= 1e-6, f"sigma={sigma}"
        assert (lse - lse_eager).abs().max() <= 1e-9 * lse_eager.abs().max() + 1e-9, f"sigma={sigma}"


def test_compiled_stages_do_not_recompile_per_batch_or_training_set(monkeypatch):
    """Each graph torch.compile builds is a Triton compile of seconds on the GPU, and past
    Dynamo's recompile limit a stage silently runs eagerly: a sampler's sweep over sigma
    compiles a few graphs (the precision tiers), and other batch and training-set sizes
    none, one query and a training set one row past a chunk boundary included."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "1")
    monkeypatch.setattr(stream, "_COMPILED", None)
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: 400)  # several chunks, and a tail
    monkeypatch.setattr(stream, "pair_batch_size", lambda d, fused: 3)  # pair batches of 3, 2 and 1, at offsets
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (1500, 96), dtype=torch.uint8, generator=gen)
    rows = as_rows64(train).float()

    def sweep(B, N):
        before = counters["stats"]["unique_graphs"]
        for sigma in (80.0, 5.0, 1.0, 0.3, 0.05, 0.002):
            pick = torch.randint(0, N, (B,), generator=gen)
            x = rows[pick] + sigma * torch.randn(B, 96, generator=gen)
            run(x, train[:N], sigma)
        return counters["stats"]["unique_graphs"] - before

    first = sweep(8, 1500)
    assert 1 <= first <= 6, f"{first} graphs for one sweep over sigma"  # 5: a graph per stage, two of chunk_logits
    assert sweep(13, 1300) == 0, "a new batch or training-set size recompiled a stage"
    assert sweep(5, 900) == 0, "a new batch or training-set size recompiled a stage"
    # one query (sizes 0 and 1 are specialized: it runs as two), and N = 3 x 400 + 1 (no
    # one-row last chunk: it takes two)
    assert sweep(1, 1201) == 0, "one query or a one-row chunk compiled graphs of their own"


def test_registered_as_the_ops_cuda_kernel():
    if not diffmem._native.AVAILABLE:
        pytest.fail(f"native extension failed to load: {diffmem._native.LOAD_ERROR}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("diffmem::optimal_denoise", "CUDA")


def test_training_norms_are_reused_until_the_set_changes(monkeypatch):
    """The norms pass over the training set runs once for calls on the same set (a
    sampler's steps), again after an in-place change or for another tensor, and every
    result is the reference's."""
    computed = []
    norms = stream._train_norms
    monkeypatch.setattr(stream, "_train_norms", lambda t, step: computed.append(1) or norms(t, step))
    monkeypatch.setattr(stream, "_NORMS_CACHE", {})
    train, gen = train_of("uint8")
    x = query_cases(as_rows64(train), gen, 0.5)

    def check(t, expected_passes, what):
        D, lse = run(x, t, 0.5)
        ref, ref_lse = dense_denoise(x, 0.5, t)
        assert_accurate(D, lse, ref, ref_lse, what)
        assert len(computed) == expected_passes, what

    check(train, 1, "first call")
    check(train, 1, "same set")
    check(train.view(train.shape), 1, "a view of the same set")
    train[3] = 255 - train[3]  # in place: the version counter moves
    check(train, 2, "after an in-place change")
    check(train.clone(), 3, "another tensor")


def compiled_stages_raising(monkeypatch, error: Exception):
    """Compiled stages that raise `error` (and log which stage was called), and a problem
    for them: (calls, x, train)."""
    calls = []

    def fake_compile(fn, **kwargs):
        def call(*args):
            calls.append(fn.__name__)
            raise error
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "1")
    monkeypatch.setattr(stream, "_COMPILED", None)
    train, gen = train_of("uint8")
    return calls, query_cases(as_rows64(train), gen, 1.0), train


def test_compiler_failure_falls_back_to_eager(monkeypatch):
    """A broken torch.compile (no working Triton on some machine, say) costs speed, not
    the result: the stages run eagerly after one warning."""
    _, x, train = compiled_stages_raising(monkeypatch, RuntimeError("compiler exploded"))
    with pytest.warns(UserWarning, match="torch.compile of (chunk_logits|chunk_weights|pair_logits) failed"):
        D, lse = run(x, train, 1.0)
    ref, ref_lse = dense_denoise(x, 1.0, train)
    assert_accurate(D, lse, ref, ref_lse, "eager after a compiler failure")


def test_out_of_memory_is_not_taken_for_a_compiler_failure(monkeypatch):
    """Out of memory in a compiled stage is raised as it is: eager kernels would need more
    memory, and the stages stay compiled for the next call."""
    calls, x, train = compiled_stages_raising(monkeypatch, torch.OutOfMemoryError("no memory left"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back to eager" warning
        for _ in range(2):
            with pytest.raises(torch.OutOfMemoryError):
                run(x, train, 1.0)
    assert len(calls) == 2  # the compiled stage was tried both times


@pytest.mark.parametrize("d", [3, 64, 3072, 12288, 2**20])
def test_direct_difference_batches_stay_bounded(d):
    """A pair batch's gathered float64 rows stay within 2^30 bytes compiled (where Dynamo may
    still run the stage eagerly) and 2^27 eager, whatever the row length."""
    for fused, limit in ((True, 2**30), (False, 2**27)):
        pairs = stream.pair_batch_size(d, fused)
        assert pairs >= 16 and (pairs * 8 * d <= limit or pairs == 16)


# ---- real images, and the samplers ----------------------------------------------------------


def test_cifar10_rows_at_every_sigma():
    """Real CIFAR-10 rows (near-duplicates and structure that random pixels lack): queries
    are noisy training images, as a sampler makes them."""
    import numpy as np

    from helpers import shared_data

    with np.load(shared_data("cifar10-train.npz")) as raw:
        images = torch.from_numpy(raw["images"][:1500].copy())
    train = images.permute(0, 3, 1, 2).reshape(1500, -1).contiguous()
    y = as_rows64(train)
    gen = torch.Generator().manual_seed(5)
    for sigma in GRID:
        x = (y[:24] + sigma * torch.randn(24, y.shape[1], generator=gen, dtype=torch.float64)).float()
        D, lse = run(x, train, sigma)
        ref, ref_lse = dense_denoise(x, sigma, train)
        assert_accurate(D, lse, ref, ref_lse, f"CIFAR-10 sigma={sigma}")


@pytest.fixture
def stream_dispatch(monkeypatch):
    """diffmem.optimal takes the op's CUDA kernel function on the CPU too."""
    from diffmem import optimal

    monkeypatch.setattr(optimal, "optimal_denoise",
                        lambda x, train, sigma, scale, labels=None, train_labels=None, topk=0:
                        optimal._cuda_kernel(x, train, sigma, scale, labels, train_labels, topk))


def test_heun_sampling_equals_the_cpu_op(stream_dispatch, monkeypatch):
    from diffmem.diffusion import EmpiricalOptimalDenoiser, heun_sampler

    train = _separated_images()
    latents = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    den = EmpiricalOptimalDenoiser(train, dtype=torch.float32)
    streamed = heun_sampler(den, latents, num_steps=10)
    monkeypatch.undo()  # back to the native CPU op
    native = heun_sampler(EmpiricalOptimalDenoiser(train, dtype=torch.float32), latents, num_steps=10)
    torch.testing.assert_close(streamed, native, rtol=0, atol=2e-3)


def test_generated_samples_are_training_images(stream_dispatch):
    from diffmem.diffusion import EmpiricalOptimalDenoiser, generate

    train = _separated_images()
    samples = generate(EmpiricalOptimalDenoiser(train, dtype=torch.float32), range(24), batch_size=10, device="cpu",
                       progress=False, num_steps=18)
    d = (samples.reshape(24, 1, -1).int() - train.reshape(1, 12, -1).int()).abs().amax(-1).amin(1)
    assert int(d.max()) <= 1, d.tolist()


def test_opcheck_of_the_kernel_function():
    """opcheck of the very function registered as the op's CUDA kernel, here bound to a
    test-only op with the same schema on the CPU (the CUDA registration gets the same check
    in test_optimal_cuda.py)."""
    lib = torch.library.Library("diffmem_stream_test", "FRAGMENT")
    lib.define("optimal_denoise(Tensor x, Tensor train, Tensor sigma, Tensor scale, Tensor? labels, "
               "Tensor? train_labels, int topk) -> (Tensor, Tensor)")
    lib.impl("optimal_denoise", stream.optimal_denoise, "CPU")
    torch.library.register_fake("diffmem_stream_test::optimal_denoise", lib=lib)(
        lambda x, train, sigma, scale, labels, train_labels, topk: (
            torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float64)))
    op = torch.ops.diffmem_stream_test.optimal_denoise
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 24, generator=gen)
    sigma = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    scale = torch.rand(5, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    lab, tl = torch.randint(0, 2, (5,), generator=gen), torch.arange(40) % 2
    for train in (torch.randint(0, 256, (40, 24), dtype=torch.uint8, generator=gen),
                  torch.randn(40, 24, generator=gen), torch.randn(40, 24, generator=gen).bfloat16()):
        torch.library.opcheck(op, (x, train, sigma, scale, None, None, 0))
        torch.library.opcheck(op, (x, train, sigma, scale, lab, tl, 0))


@pytest.mark.parametrize("coherent", [True, False], ids=["coherent", "incoherent"])
@pytest.mark.parametrize("kind", ["uint8", "float32", "bfloat16"])
def test_emulated_products_within_the_error_model(kind, coherent):
    """The measure tests/test_optimal_cuda.py applies to the GPU's tensor cores, on the CPU
    emulation (float32 BLAS, rounding to nearest): well inside the estimate."""
    vs_estimate, vs_bound = product_error_ratios(kind, coherent, "cpu")
    assert vs_estimate <= 1.0 and vs_bound <= 1.0


@pytest.mark.parametrize("coherent", [True, False], ids=["coherent", "incoherent"])
@pytest.mark.parametrize("terms", [2, 3])
def test_int8_products_exact_and_within_the_error_model(terms, coherent):
    """The same measure for the int8 products of uint8 rows: exact int32 sums, and x . p
    within the estimate and the bound of x's residual after the terms."""
    int_err, vs_estimate, vs_bound = int8_product_errors(terms, coherent, "cpu")
    assert int_err == 0.0 and vs_estimate <= 1.0 and vs_bound <= 1.0


def test_int8_terms_resolve_x():
    """x's int8 terms: each in [-127, 127], each residual at most half a step of the next
    (8 bits per term), the relative residuals reported as they are, zero padding, and
    x = 0 and float32's extremes handled."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 37, generator=gen, dtype=torch.float64) * torch.tensor([1e-30, 1e-3, 1.0, 1e4, 1e37])[:, None]
    x = torch.cat([x.float().double(), torch.zeros(1, 37, dtype=torch.float64)])
    q, c, rel = stream.int8_terms(x, 24, 40)
    assert q.shape == (stream.INT8_TERMS, 24, 40) and q.dtype == torch.int8
    assert not q[:, 6:].any() and not q[:, :, 37:].any()
    approx = torch.zeros_like(x)
    top = x.abs().amax(1, keepdim=True)
    for j in range(stream.INT8_TERMS):
        approx = approx + c[:, j : j + 1] * q[j, :6, :37].double()
        e = x - approx
        step = top / 127 / stream.INT8_STEP**j
        assert ((e.abs() <= 0.5 * step * (1 + 1e-12)) | (top == 0)).all(), j
        xn = x.norm(dim=1, keepdim=True)
        expect = torch.where(xn > 0, e.norm(dim=1, keepdim=True) / xn.clamp_min(1e-300), 0.0)
        assert torch.equal(rel[:, j : j + 1], expect)
    assert (rel[:5, -1] <= 2.0**-22).all() and rel[5].eq(0).all()


def test_work_counting_script_on_cifar10(tmp_path):
    """bench/optimal_work.py counts the kernel's GEMM work. CIFAR-10 rows are uint8, so the
    logits take int8 products: two terms (one int8 unit) where few items matter (small
    sigma; the weighted sum over active rows only) and at large sigma, where the weighted
    sum is dense (one float16 unit), plus the rounding residuals of the items holding at
    least 1/1024 of some query's final weight (at most 1024 a query); and D within the
    budget."""
    import json
    import sys

    from helpers import shared_data

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bench import optimal_work

    out = tmp_path / "work.json"
    B = 24  # no padded query rows (torch._int_mm asks for more than 16)
    assert optimal_work.main(["--B", str(B), "--N", "2000", "--sigmas", "0.002,80", "--threads", "1",
                              "--data", str(shared_data("cifar10-train.npz")), "--json", str(out)]) == 0
    small, large = json.loads(out.read_text())["runs"]
    assert small["int8_gemm_units"] == 2.0 and small["float16_gemm_units"] < 0.5, small
    assert large["int8_gemm_units"] == 2.0, large
    heavy_rows = min(2000, B * stream.HEAVY_SHARE)  # the residuals' product, over the rows some query holds heavy
    assert 1.0 <= large["float16_gemm_units"] <= 1.0 + heavy_rows / 2000 + 1e-9, large
    assert large["float16_equivalent_units"] == round(large["float16_gemm_units"] + 1.0, 4)
    for run in (small, large):  # every product has one purpose; the logits' are the int8 ones here
        by = run["float16_equivalent_units_by_purpose"]
        assert sum(by.values()) == pytest.approx(run["float16_equivalent_units"], abs=1e-3), run
        assert by["logits"] == 1.0  # two int8 terms, half a float16 unit each
    assert large["float16_equivalent_units_by_purpose"]["weighted_sum"] == 1.0  # dense at sigma 80
    assert max(small["rel_err_vs_float64"], large["rel_err_vs_float64"]) <= TOL
