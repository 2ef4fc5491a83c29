"""Independent references shared by the tests."""
import pathlib

import pytest
import torch

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def brute_force_topk(x: torch.Tensor, y: torch.Tensor, k: int):
    """Independent reference: all pairwise squared distances by direct differences in
    float64, ordered by (distance, index)."""
    x = x.reshape(x.shape[0], -1).cpu().double()
    y = y.reshape(y.shape[0], -1).cpu().double()
    step = max(1, 2**24 // (y.shape[0] * y.shape[1]))  # bounds the broadcast's memory
    dist = torch.cat([((x[s : s + step, None, :] - y[None]) ** 2).sum(-1) for s in range(0, x.shape[0], step)])
    d, i = torch.sort(dist, dim=1, stable=True)
    return d[:, :k], i[:, :k]


FLOAT64_RANGE_END_CASES = ["overflowing distances", "underflowing differences"]


def float64_range_end_rows(case: str):
    """(queries, refs) at the ends of the float64 range: squared distances that overflow to
    inf (they tie, in index order, in a float64 brute force), and differences 300 orders of
    magnitude below the values (which a screen's scaled copies flush to zero)."""
    if case == "overflowing distances":
        return (torch.tensor([[1e308], [0.0]], dtype=torch.float64),
                torch.tensor([[-1e308], [-0.5e308], [1e308]], dtype=torch.float64))
    return (torch.tensor([[1e300, 0.0]], dtype=torch.float64),
            torch.tensor([[1e300, 3e-30], [1e300, 2e-30], [1e300, -4e-30]], dtype=torch.float64))


def shared_data(name: str) -> pathlib.Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared/data)")
    return path


def matmul_precision_state():
    """The float32 matmul precision as both of torch's APIs see it: the per-backend CUDA and
    CPU (mkldnn) settings and the legacy one ("mixed" where torch >= 2.9 refuses to say,
    once the two APIs were mixed)."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "mixed"
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision, legacy


def reset_matmul_precision():
    """Back to the state torch starts in: ("none", "none", "highest")."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.mkldnn.matmul.fp32_precision = "none"
