"""Build diffmem._C here for the GPU machine's torch and carry it there, so a GPU session
does not spend its device minutes compiling the CUDA kernels.

    # here, in a venv with the GPU machine's torch (2.11.0+cu130 on the H200; pip takes it
    # from PyPI: python3 -m venv /tmp/v211 && /tmp/v211/bin/pip install torch==2.11.0
    # numpy ninja setuptools), from the repository root:
    /tmp/v211/bin/python bench/prebuilt.py pack           # builds into carry/prebuilt/
    # there, first thing in a call that carries it (carry=[..., "carry/prebuilt"]):
    python3 bench/prebuilt.py install                     # bench/gpu_check.sh does this itself

`pack` builds the extension with the CUDA kernels for sm_90 (Hopper) in a temporary build
folder (the checkout's own build is left alone), strips its debug sections and writes it
with a stamp: the torch version it was built against and the SHA-256 of the sources that
go into it (csrc/, setup.py). `install` copies it into diffmem/ only when the machine's
torch is that version and the checkout's sources have that digest, then checks in a fresh
interpreter that it loads with its CUDA kernels; otherwise (or when it does not load:
another C library there) it leaves diffmem/ as it was and exits 1, and the caller builds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "carry" / "prebuilt"
LIBRARY = "_C.abi3.so"  # py_limited_api: one file serves every Python >= 3.10
STAMP = "stamp.json"
ARCH_LIST = "9.0"  # H100/H200
# Run in a fresh interpreter from the tree being checked: does the extension load, with CUDA?
LOAD_CHECK = ("import diffmem._native as n; import sys; "
              "sys.exit(0 if n.AVAILABLE and n.built_with_cuda() else 1)")


def sources_digest(root: pathlib.Path = ROOT) -> str:
    """SHA-256 over the paths and bytes of everything the extension is built from."""
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file()) + [root / "setup.py"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def pack(dest: pathlib.Path, root: pathlib.Path = ROOT) -> pathlib.Path:
    """Build the CUDA extension against this interpreter's torch; write it and its stamp."""
    import torch

    if torch.version.cuda is None:
        raise ValueError(f"torch {torch.__version__} here is not a CUDA build; use the GPU machine's torch")
    digest = sources_digest(root)
    with tempfile.TemporaryDirectory(prefix="diffmem-prebuild-") as tmp:
        env = dict(os.environ, DIFFMEM_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=ARCH_LIST,
                   MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", f"{tmp}/lib", "--build-temp", f"{tmp}/temp"]
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
        built = next(pathlib.Path(tmp, "lib").rglob(LIBRARY), None)
        if built is None:
            raise ValueError(f"the build wrote no {LIBRARY}")
        if shutil.which("strip"):  # debug sections are most of the file; carry is 64 MiB a call
            subprocess.run(["strip", "--strip-debug", str(built)], check=True)
        if sources_digest(root) != digest:
            raise ValueError("the sources changed during the build; run pack again")
        dest.mkdir(parents=True, exist_ok=True)
        _write_atomic(dest / LIBRARY, built.read_bytes())
    stamp = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": ARCH_LIST,
             "sources_sha256": digest}
    _write_atomic(dest / STAMP, (json.dumps(stamp, indent=1) + "\n").encode())
    print(f"{dest / LIBRARY}: {(dest / LIBRARY).stat().st_size / 2**20:.1f} MiB, for torch {stamp['torch']}")
    return dest / LIBRARY


def install(src: pathlib.Path, root: pathlib.Path = ROOT, torch_version: str | None = None) -> str:
    """Put the carried extension into root/diffmem when it fits; returns what was done.
    Raises ValueError, with the reason, when it does not fit or does not load."""
    stamp_path = src / STAMP
    if not stamp_path.is_file() or not (src / LIBRARY).is_file():
        raise ValueError(f"no prebuilt extension in {src} ({STAMP} and {LIBRARY} expected)")
    stamp = json.loads(stamp_path.read_text())
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if stamp.get("torch") != torch_version:
        raise ValueError(f"built for torch {stamp.get('torch')}, this machine has {torch_version}")
    if stamp.get("sources_sha256") != sources_digest(root):
        raise ValueError("built from other sources than this checkout's csrc/ and setup.py")
    target = root / "diffmem" / LIBRARY
    backup = target.with_name(target.name + ".before-prebuilt")
    had_one = target.exists()
    if had_one:
        shutil.copy2(target, backup)
    try:
        _write_atomic(target, (src / LIBRARY).read_bytes())
        check = subprocess.run([sys.executable, "-c", LOAD_CHECK], cwd=root, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(root), DIFFMEM_QUIET="1"))
        if check.returncode != 0:
            raise ValueError("the prebuilt extension does not load with its CUDA kernels here"
                             + (f": {check.stderr.strip().splitlines()[-1]}" if check.stderr.strip() else ""))
    except BaseException:
        if had_one:
            os.replace(backup, target)
        else:
            target.unlink(missing_ok=True)
        raise
    backup.unlink(missing_ok=True)
    return f"installed {target} (torch {torch_version}, sources {stamp['sources_sha256'][:12]})"


def _write_atomic(target: pathlib.Path, data: bytes) -> None:
    # Not diffmem.training.checkpoint.write_atomic: importing diffmem would load an
    # extension into this process, and install must not load the one it may replace.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="build for this interpreter's torch into DIR (here)")
    p.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR)
    i = sub.add_parser("install", help="use the carried build when it fits this machine (there)")
    i.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.dir)
        else:
            print(install(args.dir))
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"prebuilt: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
