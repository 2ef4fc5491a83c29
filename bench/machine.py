"""Facts about the machine and software a benchmark ran on, for the JSON record."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """CPU model name; /proc/cpuinfo is the most specific source on Linux.

    Virtual machines often report a bare family name ("AMD EPYC", "Intel(R) Xeon(R)
    Processor") for CPUs of different generations and speeds; the name then gets the
    CPUID family and model, so records of different CPUs don't share a name.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown-cpu"
    if not re.search(r"\d", name) and "cpu family" in fields and "model" in fields:
        name = f"{name} family {fields['cpu family']} model {fields['model']}"
    return name


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that is missing)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def has_avx512() -> bool:
    return "avx512f" in cpu_flags()


def has_avx512_bf16() -> bool:
    return {"avx512f", "avx512_bf16"} <= cpu_flags()


def device_name(device: str, threads: int | None) -> str:
    """Human-readable device; the CPU thread count is part of it because it sets the speed."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} {threads or torch.get_num_threads()}t"


def slug(text: str) -> str:
    """File-name-safe lower-case form, e.g. 'AMD EPYC 2t' -> 'amd-epyc-2t'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD; where the checkout has no git history (a copied working tree, as on the GPU
    machine), what DIFFMEM_GIT_COMMIT says, set in the command that copied it."""
    return _git("rev-parse", "HEAD") or os.environ.get("DIFFMEM_GIT_COMMIT") or "unknown"


def git_dirty() -> bool | None:
    """True when the tracked code differs from the commit, so a result can't be tied to it
    exactly. bench/results/ does not count: a benchmark rewriting its own record there must
    not mark the records written after it. Without git history: DIFFMEM_GIT_DIRTY (0/1)."""
    if _git("rev-parse", "HEAD") is None:  # no commit to differ from
        flag = os.environ.get("DIFFMEM_GIT_DIRTY")
        return None if flag not in ("0", "1") else flag == "1"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return None if status is None else bool(status)


def faiss_info() -> dict:
    try:
        import faiss
    except ImportError as exc:
        return {"available": False, "error": str(exc)}
    opts = getattr(faiss, "get_compile_options", lambda: None)()
    return {"available": True, "version": faiss.__version__, "compile_options": opts}


def diffmem_info() -> dict:
    """Which diffmem was measured and its active native backends.

    Availability means `diffmem.knn` imports: a half-written checkout can still import
    `diffmem` itself (even as a bare namespace package) without having the API.
    """
    try:
        import diffmem
        import diffmem.knn  # noqa: F401
    except Exception as exc:
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    info = {"available": True, "version": getattr(diffmem, "__version__", None),
            "path": getattr(diffmem, "__file__", None)}
    try:
        from diffmem import info as dm_info
        info["backends"] = dm_info.backends()
    except Exception as exc:  # backends() is optional; its absence is not an error
        info["backends"] = None
        info["backends_error"] = f"{type(exc).__name__}: {exc}"
    return info


def resolve_device_defaults(args, defaults: dict) -> None:
    """Fill the options left unset with the device's defaults (sizes differ between CPU
    and GPU runs) and default to 2 CPU threads (the project's machines). The values given
    are checked by their argparse types (bench/cli.py)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and args.device == "cpu":
        args.threads = 2
