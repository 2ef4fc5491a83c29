"""Targets, the printed table and the JSON record of a kNN benchmark run."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """A speed goal for diffmem against one method, on one device and input dtype."""
    device: str
    dtype: str
    method: str
    metric: str  # "method/diffmem" (>1: diffmem faster) or "diffmem/method"
    op: str      # ">=" or "<="
    value: float

    @property
    def label(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def evaluate(self, ratio: float | None) -> dict:
        """ratio = method_time / diffmem_time; None when either side did not run."""
        out = {**asdict(self), "label": self.label, "measured": None, "pass": None}
        if ratio:
            measured = ratio if self.metric == "method/diffmem" else 1.0 / ratio
            out["measured"] = measured
            out["pass"] = measured >= self.value if self.op == ">=" else measured <= self.value
        return out


TARGETS = [
    Target("cpu", "uint8", "faiss_flat_l2", "method/diffmem", ">=", 1.2),
    Target("cpu", "uint8", "cdist_topk", "method/diffmem", ">=", 2.0),
    Target("cpu", "float32", "faiss_flat_l2", "method/diffmem", ">=", 1.0),
    Target("cuda", "uint8", "bare_gemm_int8", "diffmem/method", "<=", 1.3),
    Target("cuda", "uint8", "cdist_topk", "method/diffmem", ">=", 10.0),
]


def target_for(device: str, dtype: str, method: str) -> Target | None:
    return next((t for t in TARGETS if (t.device, t.dtype, t.method) == (device, dtype, method)),
                None)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _verdict(t: dict | None) -> tuple[str, str]:
    """(target, PASS/FAIL); n/a when diffmem or the method did not run."""
    if t is None:
        return "", ""
    return t["label"], {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]


def _row(name: str, m: dict) -> list[str]:
    if m.get("skipped"):
        return [name, "skipped: " + m["skipped"][:100]]
    vs, ex = m.get("vs_diffmem") or {}, m.get("exact_sample") or {}
    exact = (f"{ex['rows_wrong']}/{ex['rows_checked']}" if "rows_wrong" in ex
             else "error" if "error" in ex else "-")
    return [name, _fmt(m["median_s"], ".4f"), _fmt(m["gmac_per_s"], ".1f"),
            _fmt(m.get("other_cpu_load"), ".0%"),
            _fmt(m.get("ratio_vs_diffmem"), ".2f"), _fmt(vs.get("rows_idx_differ"), ".4f"),
            _fmt(vs.get("max_rel_dist_err"), ".1e"), exact, *_verdict(m.get("target"))]


HEADER = ["method", "median s", "GMAC/s", "other load", "meth/diffmem", "idx differ",
          "max rel err", "exact wrong", "target", "result"]


BUSY_WARN = 0.05  # share of all cores used by other processes that makes timings suspect


def table(title: str, methods: dict) -> str:
    rows = [_row(n, m) for n, m in methods.items()]
    full = [HEADER] + [r for r in rows if len(r) == len(HEADER)]
    widths = [max(len(r[i]) for r in full) for i in range(len(HEADER))]

    def line(r: list[str]) -> str:
        if len(r) != len(HEADER):  # skipped method: its reason spans the columns
            return f"{r[0].ljust(widths[0])}  {r[1]}"
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    lines = [title, line(HEADER), *map(line, rows)]
    screen = methods.get("diffmem", {}).get("screen")
    if screen and screen["refs_per_query_mean"] is not None:
        lines.append(f"diffmem's screen ({screen['screen']}) left {screen['refs_per_query_mean']:.2f} refs a "
                     f"query for the exact re-rank (median {screen['refs_per_query_median']:g}, max "
                     f"{screen['refs_per_query_max']}); {screen['queries_screened_again']} queries screened again")
    worst = max((m.get("other_cpu_load") or 0 for m in methods.values()), default=0)
    if worst > BUSY_WARN:
        lines.append(f"WARNING: other processes used up to {worst:.0%} of the CPU while "
                     "timing; these timings understate this machine's speed.")
    return "\n".join(lines)


NOTES = [
    "Each method: 1 untimed warm-up call, then --repeat timed calls; median reported.",
    "Conversions (uint8->float32/int8), host->device copies, faiss index build and "
    "torch.compile compilation are done before timing and excluded.",
    "faiss_flat_l2 times IndexFlatL2.search only; its squared distances are sqrt'ed.",
    "bare_gemm_* are floors (the Q x d @ d x N product alone, same chunking as cdist_topk); "
    "they return no neighbours and are not cross-checked.",
    "GMAC/s = Q*N*d / median seconds / 1e9 for every method, floors included.",
    "other_cpu_load = CPU time other processes used while a method was timed, as a share of "
    "all cores (Linux /proc/stat); above a few percent the timings are suspect.",
    "ratio_vs_diffmem = method median / diffmem median of the same dtype run (>1: diffmem faster).",
    "vs_diffmem: rows_idx_differ = fraction of query rows whose neighbour index set differs "
    "from diffmem's (float baselines may differ on near-ties); distance errors compare rank by rank.",
    "exact_sample: a random subset of query rows checked against float64 ground truth; a row is "
    "wrong unless the true distances of the returned neighbours equal the true k smallest.",
    "Targets are stated for the default sizes; results at other sizes are indicative only.",
    "diffmem.screen (float input on the CPU): refs per query its first screen left for the exact "
    "re-rank, from torch.ops.diffmem.knn_screen_counts in a separate, untimed call.",
]


def write_json(record: dict, path: Path, *, complete: bool = True) -> None:
    """The record, atomically; complete=False marks a partial one, written as a long run
    goes so that a run cut short (a device's time limit) keeps what it measured."""
    from diffmem.training.checkpoint import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "complete": complete}
    write_atomic(path, lambda file: file.write(json.dumps(record, indent=2, default=str) + "\n"), "w")
