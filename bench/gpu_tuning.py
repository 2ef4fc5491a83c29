"""Tile and chunk sizes of the CUDA kernels against their floors, in one short run, so a
single GPU session also tells which defaults to keep.

    python bench/gpu_tuning.py --device cuda            # kNN tiles at Q=10,000 N=50,000; optimal chunks at B=512
    python bench/gpu_tuning.py --device cpu --small     # a smoke test of the script itself

kNN (`diffmem.knn.topk`, uint8, k=2): the CUDA kernel (DIFFMEM_CUDA_KNN=1, set by this
script) at each DIFFMEM_KNN_TILE_Q x DIFFMEM_KNN_TILE_N, which it reads on every call,
against the bare chunked torch._int_mm of bench/knn.py. The optimal denoiser
(`diffmem.optimal.denoise`, uint8 rows, float32 queries x = y + sigma n): the CUDA kernel
(DIFFMEM_CUDA_OPTIMAL=1) at each cap on the rows per chunk, against one bare int8 and one
float16 GEMM (bench/optimal.py's floor for uint8 rows, whose logits run on int8 tensor cores). Medians of --repeat calls after a warm-up, synchronized. On
the CPU the kNN tile knobs do nothing (they are read by the CUDA kernel only).

Writes bench/results/gpu-tuning-<device>.json (--json to choose).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli, knn_data, knn_methods, machine  # noqa: E402
from bench.knn import sync_for, time_calls  # noqa: E402
from diffmem.training.checkpoint import write_json_atomic  # noqa: E402

FULL = dict(Q=10000, N=50000, d=3072, B=512, tiles=[(4096, 2048), (4096, 4096), (4096, 8192), (10000, 2048),
                                                     (10000, 4096), (2048, 2048)],
            chunks=[4096, 8192, 12288, 16384, 24576], sigmas=[0.01, 1.0, 80.0])
SMALL = dict(Q=64, N=512, d=48, B=16, tiles=[(32, 64), (64, 128)], chunks=[128, 512], sigmas=[0.01, 80.0])


def median_time(run, repeat: int, sync) -> float:
    return statistics.median(time_calls(run, repeat, sync)[1])


def knn_tiles(sizes: dict, device: str, repeat: int, seed: int, log) -> dict:
    import diffmem.knn

    queries, refs, _ = knn_data.load("random", sizes["Q"], sizes["N"], sizes["d"], seed)
    inp = knn_methods.Inputs(queries, refs, 2, device)
    sync = sync_for(device)
    floor = median_time(knn_methods.build_bare_gemm_int8(inp, "uint8").run, repeat, sync)
    q, r = inp.for_dtype("uint8")
    truth = diffmem.knn.topk(q, r, 2, squared=True)  # the default tiles' answer
    rows = []
    for tq, tn in sizes["tiles"]:
        os.environ["DIFFMEM_KNN_TILE_Q"], os.environ["DIFFMEM_KNN_TILE_N"] = str(tq), str(tn)
        try:
            out = diffmem.knn.topk(q, r, 2, squared=True)
            same = bool(torch.equal(out[0], truth[0]) and torch.equal(out[1], truth[1]))
            t = median_time(lambda: diffmem.knn.topk(q, r, 2), repeat, sync)
        finally:
            del os.environ["DIFFMEM_KNN_TILE_Q"], os.environ["DIFFMEM_KNN_TILE_N"]
        rows.append(dict(tile_q=tq, tile_n=tn, median_s=t, vs_floor=t / floor, same_answer=same))
        log(f"knn tiles {tq} x {tn}: {t:.5f} s, {t / floor:.3f}x the int8 floor, same answer {same}")
    return dict(floor="bare_gemm_int8", floor_median_s=floor, runs=rows)


def optimal_chunks(sizes: dict, device: str, repeat: int, seed: int, log) -> dict:
    from bench.optimal import methods
    from diffmem import optimal, optimal_stream

    gen = torch.Generator().manual_seed(seed)
    B, N, d = sizes["B"], sizes["N"], sizes["d"]
    train = torch.randint(0, 256, (N, d), generator=gen, dtype=torch.uint8).to(device)
    y = train[:B].double() / 127.5 - 1
    sync = sync_for(device)
    x0 = y.float().to(device)
    floor_run = methods(x0, train, train.float() / 127.5 - 1, 1.0, floors={"floor": "int8+float16"})["floor"]
    floor = median_time(floor_run, repeat, sync)
    default_rows = optimal_stream.chunk_rows
    rows = []
    try:
        for sigma in sizes["sigmas"]:
            x = (y + sigma * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device)).float()
            for cap in sizes["chunks"]:
                optimal_stream.chunk_rows = lambda B, N, d, cap=cap: int(min(N, cap))
                t = median_time(lambda: optimal.denoise(x, sigma, train), repeat, sync)
                rows.append(dict(sigma=sigma, chunk_rows=cap, median_s=t, vs_floor=t / floor))
                log(f"optimal sigma {sigma:g}, chunks of {cap} rows: {t:.5f} s, {t / floor:.3f}x the int8 + float16 floor")
    finally:
        optimal_stream.chunk_rows = default_rows
    return dict(floor="bare_gemm_int8_float16 (torch._int_mm, then a float16 GEMM with float32 results)", floor_median_s=floor,
                default_chunk_rows=default_rows(B, N, d), runs=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeat", type=cli.positive_int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="knn,optimal", help="comma list of knn, optimal")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    parts = {"knn": knn_tiles, "optimal": optimal_chunks}
    names = [p for p in args.parts.split(",") if p]
    unknown = [n for n in names if n not in parts]
    if unknown or not names:
        parser.error(f"--parts must be a comma list of {', '.join(parts)}, got {args.parts!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_tuning: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    os.environ.setdefault("DIFFMEM_CUDA_KNN", "1")
    os.environ.setdefault("DIFFMEM_CUDA_OPTIMAL", "1")
    sizes = SMALL if args.small else FULL
    device_name = machine.device_name(args.device, None)
    out = args.json or ROOT / "bench" / "results" / f"gpu-tuning-{machine.slug(args.device + ' ' + device_name)}.json"
    record = dict(command=" ".join([sys.executable, *sys.argv]), git_commit=machine.git_commit(),
                  git_dirty=machine.git_dirty(), device=device_name, torch=torch.__version__,
                  diffmem=machine.diffmem_info(), sizes={k: v for k, v in sizes.items()},
                  env={k: os.environ[k] for k in ("DIFFMEM_CUDA_KNN", "DIFFMEM_CUDA_OPTIMAL")})

    def log(line: str) -> None:
        print(line, flush=True)

    for name in names:
        record[name] = parts[name](sizes, args.device, args.repeat, args.seed, log)
        write_json_atomic({**record, "complete": False}, out)  # a run cut short keeps this part
    write_json_atomic({**record, "complete": True}, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main("gpu_tuning", main))
