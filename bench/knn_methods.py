"""The exact top-k implementations that the kNN benchmark times against each other.

Every builder turns prepared inputs into a `Method` whose `run()` is the timed call
and returns (dist, idx) so results can be cross-checked. Work that a caller would
do once (type conversion, index build, compilation) happens in the builder, untimed.
"""
from __future__ import annotations

import functools
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

CHUNK_BYTES = 256 * 2**20  # keeps each (chunk x N) result matrix <= ~256 MB
COMPILE_LIMIT_S = 120


class Skipped(Exception):
    """A method that cannot run here; the message says why and goes into the report."""


@dataclass
class Method:
    name: str
    run: Callable[[], tuple]  # (dist, idx); (None, None) for GEMM floors
    computes_in: str          # dtype the arithmetic is done in
    note: str = ""


DTYPES = ("uint8", "float32", "float64")  # diffmem's input dtypes a run can time


class Inputs:
    """The same rows in every form the methods need, converted once before timing."""

    def __init__(self, queries: np.ndarray, refs: np.ndarray, k: int, device: str):
        self.device = torch.device(device)
        self.k = k
        self.q_u8 = torch.from_numpy(queries.reshape(len(queries), -1)).to(self.device)
        self.r_u8 = torch.from_numpy(refs.reshape(len(refs), -1)).to(self.device)
        self.q_f32 = self.q_u8.float()
        self.r_f32 = self.r_u8.float()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.q_u8.shape[0], self.r_u8.shape[0], self.q_u8.shape[1]

    def for_dtype(self, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype == "float64":
            return self.float64
        return {"uint8": (self.q_u8, self.r_u8), "float32": (self.q_f32, self.r_f32)}[dtype]

    @functools.cached_property
    def float64(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_f32.double(), self.r_f32.double()

    @functools.cached_property
    def numpy_f32(self) -> tuple[np.ndarray, np.ndarray]:
        return self.q_f32.cpu().numpy(), self.r_f32.cpu().numpy()


def chunks(Q: int, N: int, bytes_per_elem: int) -> list[tuple[int, int]]:
    """Near-equal query chunks within CHUNK_BYTES, so a compiled graph sees few shapes."""
    max_rows = max(1, CHUNK_BYTES // (N * bytes_per_elem))
    n = math.ceil(Q / max_rows)
    rows = math.ceil(Q / n)
    return [(s, min(s + rows, Q)) for s in range(0, Q, rows)]


# --- diffmem -----------------------------------------------------------------

def build_diffmem(inp: Inputs, dtype: str) -> Method:
    try:
        import diffmem.knn
    except Exception as exc:  # the package may be mid-development; baselines still run
        raise Skipped(f"import diffmem.knn failed: {type(exc).__name__}: {exc}") from exc
    q, r = inp.for_dtype(dtype)
    k = inp.k
    return Method("diffmem", lambda: diffmem.knn.topk(q, r, k), dtype)


# --- faiss ---------------------------------------------------------------------

def build_faiss_flat_l2(inp: Inputs, dtype: str) -> Method:
    if inp.device.type != "cpu":
        raise Skipped("faiss-cpu baseline runs on CPU only")
    try:
        import faiss
    except ImportError as exc:
        raise Skipped(f"faiss not importable: {exc}") from exc
    q, r = inp.numpy_f32
    index = faiss.IndexFlatL2(r.shape[1])
    index.add(r)  # built outside the timed call, as a reused index would be
    k = inp.k

    def run():
        d2, idx = index.search(q, k)
        # faiss returns squared L2 from |x|^2+|y|^2-2xy, which can dip below 0
        return np.sqrt(np.maximum(d2, 0)), idx

    return Method("faiss_flat_l2", run, "float32",
                  "times index.search only (index built and data converted to float32 "
                  "beforehand); sqrt of faiss's squared distances")


# --- torch.cdist + topk ------------------------------------------------------------

def _cdist_chunk(qc: torch.Tensor, r: torch.Tensor, k: int):
    return torch.cdist(qc, r).topk(k, dim=1, largest=False)


def _chunked_topk(chunk_fn, q: torch.Tensor, r: torch.Tensor, k: int):
    parts = [chunk_fn(q[s:e], r, k) for s, e in chunks(len(q), len(r), 4)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def build_cdist_topk(inp: Inputs, dtype: str) -> Method:
    q, r, k = inp.q_f32, inp.r_f32, inp.k
    return Method("cdist_topk", lambda: _chunked_topk(_cdist_chunk, q, r, k), "float32",
                  "float32 copies made beforehand; torch.cdist default compute_mode")


@functools.cache
def _compiled_chunk_fn():
    # One compiled object per process, so the float32 run reuses the uint8 run's graphs.
    return torch.compile(_cdist_chunk, dynamic=False)


_COMPILE_FAILURES: dict[str, str] = {}  # device -> reason; don't pay a failed compile twice


class _CompileTimeout(Exception):
    pass


def _run_with_limit(fn, seconds: int):
    """Run fn, aborting via SIGALRM where possible; also check the time afterwards."""
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise _CompileTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    t0 = time.perf_counter()
    try:
        if use_alarm:
            signal.alarm(seconds)
        fn()
    except Exception:
        if fired:  # torch may wrap our exception; the flag tells us what happened
            raise _CompileTimeout() from None
        raise
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    if time.perf_counter() - t0 > seconds:
        raise _CompileTimeout()


def build_cdist_topk_compiled(inp: Inputs, dtype: str) -> Method:
    device = inp.device.type
    if device in _COMPILE_FAILURES:
        raise Skipped(_COMPILE_FAILURES[device])
    q, r, k = inp.q_f32, inp.r_f32, inp.k
    fn = _compiled_chunk_fn()
    run = lambda: _chunked_topk(fn, q, r, k)
    try:
        _run_with_limit(run, COMPILE_LIMIT_S)  # compiles every chunk shape; untimed
    except _CompileTimeout:
        _COMPILE_FAILURES[device] = f"torch.compile took > {COMPILE_LIMIT_S} s"
        raise Skipped(_COMPILE_FAILURES[device]) from None
    except Exception as exc:
        _COMPILE_FAILURES[device] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:500]
        raise Skipped(_COMPILE_FAILURES[device]) from exc
    return Method("cdist_topk_compiled", run, "float32",
                  "torch.compile(cdist+topk chunk, dynamic=False); compile time excluded")


# --- GEMM floors -----------------------------------------------------------------

def _chunked_mm(mm, q: torch.Tensor, rt: torch.Tensor, out: torch.Tensor):
    """The Q x N product in the same chunks as cdist_topk, into one reused buffer."""
    for s, e in chunks(len(q), rt.shape[1], 4):
        mm(q[s:e], rt, out=out[: e - s])
    return None, None


def build_bare_gemm_f32(inp: Inputs, dtype: str) -> Method:
    q, r = inp.q_f32, inp.r_f32
    out = torch.empty(chunks(len(q), len(r), 4)[0][1], len(r), device=inp.device)
    return Method("bare_gemm_f32", lambda: _chunked_mm(torch.mm, q, r.t(), out), "float32",
                  "floor: chunked torch.mm Q x d @ d x N, no distance/top-k work")


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def build_bare_gemm_int8(inp: Inputs, dtype: str) -> Method:
    if not hasattr(torch, "_int_mm"):
        raise Skipped("torch._int_mm not in this torch")
    Q, N, d = inp.shape
    spans = chunks(Q, N, 4)
    rows = spans[0][1]
    # uint8 - 128 fits int8 and leaves distances unchanged. The CUDA kernel wants d
    # and N multiples of 8, so pad with zeros; queries are padded to whole chunks so
    # no short tail chunk hits its > 16-rows rule.
    d8, n8 = math.ceil(d / 8) * 8, math.ceil(N / 8) * 8
    q8 = _pad_to((inp.q_u8.to(torch.int16) - 128).to(torch.int8), rows * len(spans), d8)
    r8 = _pad_to((inp.r_u8.to(torch.int16) - 128).to(torch.int8), n8, d8)
    out = torch.empty(rows, n8, dtype=torch.int32, device=inp.device)
    run = lambda: _chunked_mm(torch._int_mm, q8, r8.t(), out)
    try:
        run()  # probe: _int_mm support differs by device and build
    except RuntimeError as exc:
        raise Skipped(f"torch._int_mm unsupported here: {exc}"[:500]) from exc
    return Method("bare_gemm_int8", run, "int8",
                  "floor: chunked torch._int_mm int8 Q x d @ d x N -> int32 "
                  f"(inputs uint8-128, padded to d={d8}, N={n8}, Q={len(q8)})")


BUILDERS = {
    "diffmem": build_diffmem,
    "faiss_flat_l2": build_faiss_flat_l2,
    "cdist_topk": build_cdist_topk,
    "cdist_topk_compiled": build_cdist_topk_compiled,
    "bare_gemm_f32": build_bare_gemm_f32,
    "bare_gemm_int8": build_bare_gemm_int8,
}
ALIASES = {"bare_gemm": ["bare_gemm_f32", "bare_gemm_int8"]}


def expand_names(names: list[str]) -> list[str]:
    out = []
    for name in names:
        for n in ALIASES.get(name, [name]):
            if n not in BUILDERS:
                raise ValueError(f"unknown method {n!r}; choose from "
                                 f"{sorted([*BUILDERS, *ALIASES])}")
            if n not in out:
                out.append(n)
    return out
