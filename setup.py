"""Build of diffmem._C with torch.utils.cpp_extension (ninja).

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit and a CUDA
build of torch are present; DIFFMEM_BUILD_CUDA=0/1 forces either way (1 fails loudly
when CUDA cannot be built).
"""
import glob
import os

from setuptools import setup

# torch guesses CUDA_HOME from the first nvcc on PATH; where that is a wrapper (here
# /usr/local/bin/nvcc) the guess lacks the CUDA libraries and the link fails. The
# toolkit's standard location is the better guess.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda/lib64"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME on import)

ROOT = os.path.dirname(os.path.abspath(__file__))

# Without a GPU torch cannot pick the CUDA architectures itself (it fails with an
# IndexError); build for Ampere and Hopper then, as CI does.
if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _want_cuda() -> bool:
    flag = os.environ.get("DIFFMEM_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "DIFFMEM_BUILD_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found"
            )
        return True
    return available


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in some versions.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_library_includes() -> list[str]:
    """Headers of the CUDA libraries torch links (cuBLAS, cuSPARSE, ...) ship in the
    nvidia-* wheels beside torch; a bare toolkit may lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "cu*", "include")))


def extensions():
    with_cuda = _want_cuda()
    sources = ["csrc/ops.cpp"] + _sources("csrc/**/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    macros = [("Py_LIMITED_API", "0x030A0000")]
    if with_cuda:
        sources += _sources("csrc/**/cuda/*.cu")
        macros.append(("DIFFMEM_WITH_CUDA", "1"))
        return [
            cpp_extension.CUDAExtension(
                "diffmem._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")] + _cuda_library_includes(),
                define_macros=macros,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "diffmem._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
