"""diffmem.optimal (the closed-form optimal denoiser) on CUDA tensors.

Whatever path diffmem.optimal.denoise takes for CUDA tensors (the PyTorch reference until
a native CUDA kernel passes these tests: diffmem._native._CUDA_VERIFIED) is compared with
the independent dense float64 implementation of tests/test_optimal.py, computed on the
CPU, and with the CPU results of the same calls. The `cuda_path` fixture runs each test
through the default dispatch and through the op's CUDA kernel forced on
(DIFFMEM_CUDA_OPTIMAL=1: the tensor-core streaming path of diffmem/optimal_stream.py,
registered from Python); without the extension that case skips.

Every test skips without a GPU.
"""
import math
import warnings

import pytest
import torch

import diffmem
from diffmem import optimal
from test_optimal import (LSE_ATOL32, TOL, _op_args, as_rows64, dense_denoise, dense_logits, query_cases, rel_err,
                          training_set)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

DEVICE = "cuda"
SIGMAS = [0.002, 0.1, 1.0, 80.0]


def _cuda_kernel_compiled() -> bool:
    """The op's CUDA kernel is registered from Python (diffmem/optimal_stream.py), so it
    exists wherever the extension loads, CUDA build or not."""
    if not diffmem._native.AVAILABLE:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("diffmem::optimal_denoise", "CUDA"))
    except Exception:
        return False


@pytest.fixture(params=["default", "native-cuda"])
def cuda_path(request, monkeypatch):
    """'default': the dispatch as shipped; 'native-cuda': the native CUDA kernel forced on,
    its stages eager (test_compiled_stages_equal_eager_on_cuda checks the compiled ones once,
    so Triton's compile time stays out of every other test)."""
    if request.param == "native-cuda":
        if not _cuda_kernel_compiled():
            pytest.skip("no native CUDA kernel of diffmem::optimal_denoise is compiled in")
        monkeypatch.setenv("DIFFMEM_CUDA_OPTIMAL", "1")
        monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "0")
    else:
        monkeypatch.delenv("DIFFMEM_CUDA_OPTIMAL", raising=False)
    return request.param


def on_cuda(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def small_problem(seed=6, N=120, d=48, B=10):
    gen = torch.Generator().manual_seed(seed)
    train = torch.rand(N, d, generator=gen) * 2 - 1
    x = (train[:B].double() + 0.3 * torch.randn(B, d, generator=gen, dtype=torch.float64)).float()
    return train, x, gen


def assert_matches_cpu(D_cuda, D_cpu, ref):
    """The CUDA result is on the GPU, within the budget of the float64 optimum, and within
    twice that of the CPU result of the same call (each may err by up to TOL)."""
    assert D_cuda.is_cuda and D_cuda.dtype == D_cpu.dtype and D_cuda.shape == D_cpu.shape
    D = D_cuda.cpu()
    assert rel_err(D, ref) <= TOL, f"vs float64: {rel_err(D, ref):.2e}"
    assert rel_err(D, D_cpu.double().reshape(len(D), -1)) <= 2 * TOL


# ---- the op ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8, torch.bfloat16])
def test_opcheck_cuda_kernel(train_dtype):
    """The op's CUDA kernel (registered from Python) against its schema and fake kernel."""
    if not _cuda_kernel_compiled():
        pytest.skip("the extension (which declares the op) is not loaded")
    x, train, sigma, scale, gen = _op_args(train_dtype=train_dtype)
    lab = torch.randint(0, 2, (x.shape[0],), generator=gen)
    tl = torch.arange(train.shape[0]) % 2
    x, train, sigma, scale, lab, tl = on_cuda(x, train, sigma, scale, lab, tl)
    op = torch.ops.diffmem.optimal_denoise
    torch.library.opcheck(op, (x, train, sigma, scale, None, None, 0))
    torch.library.opcheck(op, (x, train, sigma, scale, lab, tl, 0))
    torch.library.opcheck(op, (x, train, sigma, scale, None, None, 3))
    torch.library.opcheck(op, (x.double(), train, sigma, scale, None, None, 0))


# ---- accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float32", "uint8"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_accuracy_against_float64_cpu(cuda_path, kind, sigma):
    train, gen = training_set(kind)
    y = as_rows64(train)
    x = query_cases(y, gen, sigma)
    D, lse = optimal.denoise(x.to(DEVICE), sigma, train.to(DEVICE), return_lse=True)
    assert D.is_cuda and lse.is_cuda and D.dtype == torch.float32 and lse.dtype == torch.float64
    ref, ref_lse = dense_denoise(x, sigma, train)
    assert rel_err(D.cpu(), ref) <= TOL, f"sigma={sigma}: relative error {rel_err(D.cpu(), ref):.2e}"
    assert ((lse.cpu() - ref_lse).abs() - 1e-9 * ref_lse.abs()).max() <= LSE_ATOL32


def test_numpy_train_and_per_query_sigma(cuda_path):
    train, gen = training_set("uint8", N=200, d=300, seed=2)
    y = as_rows64(train)
    x = query_cases(y, gen, 0.5)
    sigma = torch.linspace(0.05, 5.0, x.shape[0], dtype=torch.float64)
    D = optimal.denoise(x.to(DEVICE), sigma, train.numpy())  # numpy rows follow x to the GPU
    ref, _ = dense_denoise(x, sigma, train)
    assert D.is_cuda and rel_err(D.cpu(), ref) <= TOL


def test_float64_input_computes_in_float64(cuda_path):
    train, gen = training_set("float32", N=100, d=256, seed=4)
    y = as_rows64(train)
    for sigma in (0.002, 1.0, 80.0):
        x = query_cases(y, gen, sigma).double()
        D = optimal.denoise(x.to(DEVICE), sigma, train.to(DEVICE))
        ref, _ = dense_denoise(x, sigma, train)
        # near-ties at sigma = 0.002: float64 roundoff of logits ~5e6 (see test_optimal.py)
        assert D.dtype == torch.float64 and rel_err(D.cpu(), ref) <= 1e-8


# ---- variants: equal to the CPU results ---------------------------------------------------


def test_class_conditional_equals_cpu(cuda_path):
    train, x, gen = small_problem()
    tl = torch.randint(0, 4, (train.shape[0],), generator=gen)
    lab = torch.randint(0, 4, (x.shape[0],), generator=gen)
    for sigma in (0.05, 0.5, 5.0):
        D_cpu = optimal.denoise(x, sigma, train, labels=lab, train_labels=tl)
        D = optimal.denoise(*on_cuda(x, sigma, train), labels=lab.to(DEVICE), train_labels=tl.to(DEVICE))
        ref, _ = dense_denoise(x, sigma, train, mask=lab[:, None] == tl[None])
        assert_matches_cpu(D, D_cpu, ref)
    # one-hot labels (as the samplers pass them), and labels left on the CPU
    D1 = optimal.denoise(x.to(DEVICE), 0.5, train.to(DEVICE), labels=torch.eye(4)[lab].to(DEVICE), train_labels=tl)
    D2 = optimal.denoise(x.to(DEVICE), 0.5, train.to(DEVICE), labels=lab, train_labels=tl.to(DEVICE))
    assert torch.equal(D1, D2)


def test_unique_labels_return_the_labelled_image(cuda_path):
    train, x, _ = small_problem(N=30)
    tl = torch.arange(30)
    lab = torch.tensor([3, 17, 0, 29, 5, 5, 11, 2, 8, 21])
    D = optimal.denoise(x.to(DEVICE), 2.0, train.to(DEVICE), labels=lab.to(DEVICE), train_labels=tl.to(DEVICE))
    torch.testing.assert_close(D.cpu(), train[lab], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 20, 120])
def test_topk_equals_cpu(cuda_path, k):
    train, x, gen = small_problem()
    train[50] = train[7]  # an exact duplicate: ties keep the smaller index
    sigma = 0.5
    y = as_rows64(train)
    logits, *_ = dense_logits(x, sigma, y)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(1, torch.sort(-logits, dim=1, stable=True).indices[:, :k], True)
    ref, _ = dense_denoise(x, sigma, train, mask=keep)
    D_cpu = optimal.denoise(x, sigma, train, topk=k)
    D = optimal.denoise(x.to(DEVICE), sigma, train.to(DEVICE), topk=k)
    assert_matches_cpu(D, D_cpu, ref)
    if k == 1:  # the nearest training item itself
        torch.testing.assert_close(D.cpu(), train[torch.cdist(x.double(), y).argmin(1)], rtol=0, atol=1e-6)
    # with labels: the k nearest of the query's class
    tl = torch.randint(0, 3, (train.shape[0],), generator=gen)
    lab = torch.randint(0, 3, (x.shape[0],), generator=gen)
    kk = min(k, 5)
    D_cpu = optimal.denoise(x, 1.0, train, topk=kk, labels=lab, train_labels=tl)
    D = optimal.denoise(x.to(DEVICE), 1.0, train.to(DEVICE), topk=kk, labels=lab.to(DEVICE), train_labels=tl.to(DEVICE))
    assert rel_err(D.cpu(), D_cpu.double()) <= 2 * TOL


def test_tikhonov_equals_cpu(cuda_path):
    train, x, _ = small_problem()
    m = 0.8
    for sigma, c in ((0.05, 0.01), (0.5, 0.1), (2.0, 1.0)):
        ref, _ = dense_denoise(x, sigma, train, m)
        ref_c = (sigma**2 * ref + (c / m) * x.double()) / (sigma**2 + c)
        D_cpu = optimal.denoise(x, sigma, train, scale=m, tikhonov=c)
        D = optimal.denoise(x.to(DEVICE), sigma, train.to(DEVICE), scale=m, tikhonov=c)
        assert_matches_cpu(D, D_cpu, ref_c)
        s = optimal.score(x.to(DEVICE), sigma, train.to(DEVICE), scale=m, tikhonov=c)
        s_ref = (m * ref - x.double()) / (sigma**2 + c)
        assert s.is_cuda and ((s.cpu().double() - s_ref).norm(dim=1) / s_ref.norm(dim=1)).max() <= TOL


@pytest.mark.parametrize("convention", ["kernel", "density"])
def test_truncation_equals_cpu(cuda_path, convention):
    train, x, gen = small_problem()
    low = train[20:24].double() + 0.9 * torch.randn(4, x.shape[1], generator=gen, dtype=torch.float64)
    x = torch.cat([x, low.float()])
    _, lse = optimal.denoise(x, 0.6, train, scale=0.9, return_lse=True)
    tau = math.exp(float(lse.median())) if convention == "kernel" else 1e-30
    kw = dict(scale=0.9, truncate=tau, truncate_convention=convention)
    s_cpu = optimal.score(x, 0.6, train, **kw)
    s = optimal.score(x.to(DEVICE), 0.6, train.to(DEVICE), **kw)
    s_plain = optimal.score(x, 0.6, train, scale=0.9)
    assert s.is_cuda
    assert ((s.cpu().double() - s_cpu.double()).norm(dim=1) / s_plain.double().norm(dim=1)).max() <= 2 * TOL


def test_mixed_devices_are_refused():
    train, x, _ = small_problem()
    with pytest.raises(ValueError, match="one device"):
        optimal.denoise(x.to(DEVICE), 0.5, train)


# ---- sampling ------------------------------------------------------------------------------


def product_error_ratios(kind: str, coherent: bool, device, d=3072, N=512, B=48, seed=0):
    """The tensor-core products x . p of the streaming kernel (tier 0, on `device`) against
    float64: the worst error over the kernel's error estimate and over its rigorous bound
    (both as chunk_logits uses them, in x . p units). The estimate decides which logits are
    trusted, so it must hold on the hardware, whose float32 accumulation may truncate rather
    than round. coherent: queries a hair from training rows (x . p ~ ||x|| ||p||)."""
    from diffmem import optimal_stream as stream

    gen = torch.Generator().manual_seed(seed)
    if kind == "uint8":
        train = torch.randint(0, 256, (N, d), generator=gen, dtype=torch.uint8)
    else:
        train = (torch.rand(N, d, generator=gen, dtype=torch.float64) * 2 - 1).float()
        train = train.bfloat16() if kind == "bfloat16" else train
    y = as_rows64(train)
    x = (y[:B] + 0.01 * torch.randn(B, d, generator=gen, dtype=torch.float64) if coherent
         else torch.rand(B, d, generator=gen, dtype=torch.float64) * 2 - 1).float()
    rows = stream._Train(train.to(device), N)
    s = stream._pow2_scale(float(x.abs().max()))
    x_hi, x_lo = stream.split_f16(x.to(device) * s)
    hi, lo = rows.product_rows(0, N)
    t = stream.mm_f16_f32(x_hi, hi.T, stream.small_products(x_hi, x_lo, hi, lo)).double().cpu() / s
    p = train.double() - 128.0 if kind == "uint8" else train.double() * rows.s_y
    err = (t - x.double() @ p.T).abs()
    xp = x.double().norm(dim=1, keepdim=True) * p.norm(dim=1)[None]
    estimate = stream.product_error(t.abs(), xp, xp, stream.U32, stream.SPLIT, math.sqrt(d), d)
    bound = 1.25 * (3.0 * d * stream.U32 + 2.0 * stream.SPLIT) * xp
    return float((err / estimate).max()), float((err / bound).max())


def int8_product_errors(terms: int, coherent: bool, device, d=3070, N=509, B=48, seed=1):
    """The int8 tensor-core products of the streaming kernel for uint8 rows (x's first
    `terms` int8 terms . (v - 128), on `device`, d and N not multiples of 8: padded): the
    int32 sums against float64 (they must be exact) and the error of x . p they give
    against the estimate and the rigorous bound chunk_logits uses (split = ||e|| / ||x||)."""
    from diffmem import optimal_stream as stream

    gen = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (N, d), generator=gen, dtype=torch.uint8)
    y = as_rows64(train)
    x = (y[:B] + 0.01 * torch.randn(B, d, generator=gen, dtype=torch.float64) if coherent
         else torch.rand(B, d, generator=gen, dtype=torch.float64) * 2 - 1).float()
    rows = stream._Train(train.to(device), N)
    R, d8 = stream.int8_shapes(B, d)
    q, c, rel = stream.int8_terms(x.double().to(device), R, d8)
    p8 = rows.int8_rows(0, N, d8)
    ints = [stream.mm_i8_i32(q[j], p8.T).cpu() for j in range(terms)]
    p = train.double() - 128.0
    exact = [q[j].cpu().double()[:B, :d] @ p.T for j in range(terms)]
    int_err = max(float((t.double()[:B, :N] - e).abs().max()) for t, e in zip(ints, exact))
    t = sum(ints[j].double()[:B, :N] * c[:, j : j + 1].cpu() for j in range(terms))
    err = (t - x.double() @ p.T).abs()
    xp = x.double().norm(dim=1, keepdim=True) * p.norm(dim=1)[None]
    split = rel[:, terms - 1 : terms].cpu()
    estimate = stream.product_error(t.abs(), xp, xp, stream.U64, split, math.sqrt(d), d, stream.INT8_WALK)
    bound = 1.25 * (3.0 * d * stream.U64 + 2.0 * split) * xp
    return int_err, float((err / estimate).max()), float((err / bound).max())


@pytest.mark.parametrize("coherent", [True, False], ids=["coherent", "incoherent"])
@pytest.mark.parametrize("terms", [2, 3])
def test_int8_products_are_exact_and_within_the_error_model(terms, coherent):
    int_err, vs_estimate, vs_bound = int8_product_errors(terms, coherent, DEVICE)
    print(f"int8 x{terms} {'coherent' if coherent else 'incoherent'}: int32 error {int_err}, worst error / "
          f"estimate {vs_estimate:.3f}, / bound {vs_bound:.3g}")
    assert int_err == 0.0
    assert vs_bound <= 1.0 and vs_estimate <= 1.0


@pytest.mark.parametrize("coherent", [True, False], ids=["coherent", "incoherent"])
@pytest.mark.parametrize("kind", ["uint8", "float32", "bfloat16"])
def test_tensor_core_products_within_the_error_model(kind, coherent):
    vs_estimate, vs_bound = product_error_ratios(kind, coherent, DEVICE)
    print(f"{kind} {'coherent' if coherent else 'incoherent'}: worst error / estimate {vs_estimate:.3f}, "
          f"/ bound {vs_bound:.3g}")
    assert vs_bound <= 1.0
    assert vs_estimate <= 1.0, f"the error estimate is exceeded by {vs_estimate:.2f}x on {torch.cuda.get_device_name()}"


def test_compiled_stages_equal_eager_on_cuda(monkeypatch):
    """The kernel's stages as torch.compile fuses them on CUDA (the default there) compute
    what the eager ones do, over the sigmas where different tiers and the active-row
    weighted sum take part, for uint8 and float32 rows."""
    from diffmem import optimal_stream as stream

    if not _cuda_kernel_compiled():
        pytest.skip("the extension (which declares the op) is not loaded")
    monkeypatch.setattr(stream, "chunk_rows", lambda B, N, d: 100)  # several chunks
    # a compiler failure would fall back to eager with a warning: here that is a failure
    warnings.filterwarnings("error", message="diffmem.optimal_stream: torch.compile")
    for kind in ("uint8", "float32"):
        train, gen = training_set(kind, N=400)
        y = as_rows64(train)
        train = train.to(DEVICE)
        for sigma in (0.002, 0.3, 3.0, 80.0):
            x = query_cases(y, gen, sigma).to(DEVICE)
            sig = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=DEVICE)
            m = torch.ones_like(sig)
            monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "0")
            D_eager, lse_eager = stream.optimal_denoise(x, train, sig, m)
            monkeypatch.setenv("DIFFMEM_OPTIMAL_COMPILE", "1")
            D, lse = stream.optimal_denoise(x, train, sig, m)
            assert rel_err(D.cpu(), D_eager.cpu().double()) <= 1e-6, f"{kind} sigma={sigma}"
            assert ((lse - lse_eager).abs().max() <= 1e-9 * lse_eager.abs().max() + 1e-9), f"{kind} sigma={sigma}"


def _separated_images(N=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("precision", [torch.float64, torch.float32])
def test_sampling_on_cuda_equals_cpu(cuda_path, precision):
    from diffmem.diffusion import EmpiricalOptimalDenoiser, heun_sampler

    train = _separated_images()
    latents = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    den_cpu = EmpiricalOptimalDenoiser(train, dtype=precision)
    den_cuda = den_cpu.to(DEVICE)
    assert den_cuda.train_images.is_cuda and den_cuda.dtype == precision
    s_cpu = heun_sampler(den_cpu, latents, num_steps=10)
    s_cuda = heun_sampler(den_cuda, latents.to(DEVICE), num_steps=10)
    assert s_cuda.is_cuda and s_cuda.dtype == torch.float64
    tol = 1e-6 if precision == torch.float64 else 2e-3
    torch.testing.assert_close(s_cuda.cpu(), s_cpu, rtol=0, atol=tol)


def test_conditional_regularized_sampling_on_cuda_equals_cpu(cuda_path):
    from diffmem.diffusion import EmpiricalOptimalDenoiser, heun_sampler

    train = _separated_images(N=20)
    tl = torch.arange(20) % 4
    labels = torch.eye(4)[torch.arange(8) % 4]
    latents = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    den_cpu = EmpiricalOptimalDenoiser(train, train_labels=tl, tikhonov=1e-3, topk=3)
    s_cpu = heun_sampler(den_cpu, latents, labels, num_steps=8)
    s_cuda = heun_sampler(den_cpu.to(DEVICE), latents.to(DEVICE), labels.to(DEVICE), num_steps=8)
    torch.testing.assert_close(s_cuda.cpu(), s_cpu, rtol=0, atol=1e-6)


def test_generate_on_cuda_copies_training_images(cuda_path):
    """End to end on the GPU (its own random streams): every sample is a training image."""
    from diffmem.diffusion import EmpiricalOptimalDenoiser, generate

    train = _separated_images()
    samples = generate(EmpiricalOptimalDenoiser(train.to(DEVICE)), range(24), batch_size=10, device=DEVICE,
                       progress=False, num_steps=18)
    assert samples.dtype == torch.uint8 and samples.shape == (24, 3, 8, 8)
    d = (samples.reshape(24, 1, -1).int() - train.reshape(1, 12, -1).int()).abs().amax(-1).amin(1)
    assert int(d.max()) <= 1, d.tolist()


# ---- memory --------------------------------------------------------------------------------


def _growth(x, sigma, train):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    D = optimal.denoise(x, sigma, train)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert bool(torch.isfinite(D).all())
    return peak - before


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_memory_does_not_grow_like_b_by_n(cuda_path, kind):
    """B x N float32 would be 20 MB at N and 80 MB at 4N; streaming over the training set
    keeps the growth of one call nearly the same at both (allowance: O(N) row norms and a
    quarter of the dense difference)."""
    B, N, d = 256, 20_000, 64
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4 * N, d), dtype=torch.uint8, generator=gen)
    train = (u8 if kind == "uint8" else u8.float() / 127.5 - 1.0).to(DEVICE)
    x = (torch.rand(B, d, generator=gen) * 2 - 1).to(DEVICE)
    optimal.denoise(x[:1], 1.0, train[:10])  # lazy initialization outside the measurement
    g1 = _growth(x, 0.05, train[:N])
    g4 = _growth(x, 0.05, train)
    dense_extra = B * 3 * N * 4
    assert g4 - g1 <= 0.25 * dense_extra + 3 * N * 8, f"growth {g1 / 2**20:.1f} MB at N, {g4 / 2**20:.1f} MB at 4N"
    assert g4 < 0.5 * B * 4 * N * 4, f"growth {g4 / 2**20:.1f} MB at 4N"
