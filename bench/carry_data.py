"""Move a dataset larger than one device call's carry limit (64 MiB) to the GPU machine in
parts, one part per consecutive call, and put it back together there, verified.

    # here: cut the archive into parts under the git-ignored carry/ folder
    python bench/carry_data.py split ../shared/data/cifar10-train.npz --parts 3
    python bench/carry_data.py head ../shared/data/cifar10-train.npz --rows 5000 --out carry/cifar10-train-5000.npz
    # there, one call per part, each carrying one part (carry=["carry/cifar10-train.part1of3.npz"], ...):
    python bench/carry_data.py gather      # moves the carried parts into data-cache/; once all
                                           # are there, writes data-cache/cifar10-train.npz
    python bench/optimal_memorization.py --device cuda --data data-cache/cifar10-train.npz ...

The machine keeps ignored files (data-cache/) between calls only while it stays warm (30 s
after a call), so the calls must follow each other at once; `gather` says which parts are
missing. Each part holds a slice of rows of every array plus the SHA-256 of the whole
arrays, and the joined archive is checked against them before it is written (atomically).
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli  # noqa: E402
from diffmem.training.checkpoint import write_atomic  # noqa: E402

PART_NAME = re.compile(r"^(?P<stem>.+)\.part(?P<i>\d+)of(?P<n>\d+)\.npz$")
META_PREFIX = "_carry_"  # keys of the bookkeeping arrays inside a part


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def split(source: pathlib.Path, parts: int, out: pathlib.Path) -> list[pathlib.Path]:
    """Write `parts` archives, each with an equal share of the rows of every array."""
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    n_rows = _rows(arrays, source)
    if not 1 <= parts <= n_rows:
        raise ValueError(f"--parts must be between 1 and the number of rows ({n_rows}), got {parts}")
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_rows, parts + 1).round().astype(int)
    meta = {f"{META_PREFIX}sha256_{key}": np.array(digest(a)) for key, a in arrays.items()}
    written = []
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        path = out / f"{source.stem}.part{i + 1}of{parts}.npz"
        payload = {key: a[lo:hi] for key, a in arrays.items()}
        payload.update(meta, **{f"{META_PREFIX}rows": np.array([lo, hi, n_rows])})
        write_atomic(path, lambda file: np.savez(file, **payload), "wb")
        written.append(path)
        print(f"{path}: rows {lo}..{hi - 1} of {n_rows}, {path.stat().st_size / 2**20:.1f} MiB")
    return written


def head(source: pathlib.Path, rows: int, out: pathlib.Path) -> pathlib.Path:
    """The first `rows` rows of every array, as one archive small enough to carry whole."""
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    n_rows = _rows(arrays, source)
    if not 1 <= rows <= n_rows:
        raise ValueError(f"--rows must be between 1 and the number of rows ({n_rows}), got {rows}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda file: np.savez(file, **{k: a[:rows] for k, a in arrays.items()}), "wb")
    print(f"{out}: rows 0..{rows - 1} of {n_rows}, {out.stat().st_size / 2**20:.1f} MiB")
    return out


def _rows(arrays: dict[str, np.ndarray], source: pathlib.Path) -> int:
    """The common number of rows of an archive's arrays."""
    if not arrays:
        raise ValueError(f"{source} holds no arrays")
    rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(rows) != 1 or -1 in rows:
        raise ValueError(f"{source}: every array needs the same number of rows, got {sorted(rows)}")
    return rows.pop()


def gather(carried: pathlib.Path, cache: pathlib.Path) -> list[pathlib.Path]:
    """Move carried parts into `cache`, then join every dataset whose parts are all there.
    Returns the joined archives."""
    cache.mkdir(parents=True, exist_ok=True)
    for part in sorted(carried.glob("*.npz")) if carried.is_dir() else []:
        if PART_NAME.match(part.name):
            shutil.copy2(part, cache / part.name)
            print(f"stashed {part.name}")
    groups: dict[tuple[str, int], set[int]] = {}
    for part in cache.glob("*.npz"):
        m = PART_NAME.match(part.name)
        if m:
            groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    joined = []
    for (stem, n), have in sorted(groups.items()):
        target = cache / f"{stem}.npz"
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            print(f"{stem}: waiting for parts {missing} of {n} (have {sorted(have)})")
        elif target.exists():
            print(f"{target}: already joined")
            joined.append(target)
        else:
            joined.append(join([cache / f"{stem}.part{i}of{n}.npz" for i in range(1, n + 1)], target))
    if not groups:
        print(f"no parts found in {carried} or {cache}")
    return joined


def join(parts: list[pathlib.Path], target: pathlib.Path) -> pathlib.Path:
    """Concatenate the parts' rows, check the whole arrays' digests, write atomically."""
    pieces: dict[str, list[np.ndarray]] = {}
    expected: dict[str, str] = {}
    next_row = 0
    for path in parts:
        with np.load(path) as archive:
            lo, hi, n_rows = (int(v) for v in archive[f"{META_PREFIX}rows"])
            if lo != next_row:
                raise ValueError(f"{path}: starts at row {lo}, expected {next_row}")
            next_row = hi
            for key in archive.files:
                if key.startswith(f"{META_PREFIX}sha256_"):
                    expected[key.removeprefix(f"{META_PREFIX}sha256_")] = str(archive[key])
                elif not key.startswith(META_PREFIX):
                    pieces.setdefault(key, []).append(archive[key])
    if next_row != n_rows:
        raise ValueError(f"parts end at row {next_row}, the dataset has {n_rows}")
    arrays = {key: np.concatenate(chunks) for key, chunks in pieces.items()}
    for key, sha in expected.items():
        if key not in arrays or digest(arrays[key]) != sha:
            raise ValueError(f"{target.name}: array {key!r} does not match the digest recorded when it was split")
    write_atomic(target, lambda file: np.savez(file, **arrays), "wb")
    print(f"joined {len(parts)} parts into {target} ({', '.join(f'{k} {a.shape}' for k, a in arrays.items())}), "
          "digests verified")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="cut an .npz into parts (here)")
    p.add_argument("source", type=pathlib.Path)
    p.add_argument("--parts", type=cli.positive_int, required=True)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "carry")
    h = sub.add_parser("head", help="the first rows of an .npz, to carry whole (here)")
    h.add_argument("source", type=pathlib.Path)
    h.add_argument("--rows", type=cli.positive_int, required=True)
    h.add_argument("--out", type=pathlib.Path, required=True)
    g = sub.add_parser("gather", help="stash carried parts and join complete sets (on the device)")
    g.add_argument("--carried", type=pathlib.Path, default=ROOT / "carry")
    g.add_argument("--cache", type=pathlib.Path, default=ROOT / "data-cache")
    args = parser.parse_args(argv)
    try:
        if args.command in ("split", "head") and not args.source.is_file():
            raise ValueError(f"no such file: {args.source}")
        if args.command == "split":
            split(args.source, args.parts, args.out)
        elif args.command == "head":
            head(args.source, args.rows, args.out)
        else:
            gather(args.carried, args.cache)
    except (ValueError, OSError) as exc:
        print(f"carry_data: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
