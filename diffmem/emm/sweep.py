"""Sweep specifications: a base training configuration, a grid of factor values, and how
|D| is chosen for each grid point (a fixed list of sizes, or an adaptive EMM search).

    name: width                    # optional, for reports
    base:                          # diffmem-train options (flag names), a preset included
      preset: emm-digits
    search: {min: 8, max: 512, tolerance: 0.25}     # adaptive EMM search per entry, or
    sizes: [16, 32, 64, 128]                         # a fixed grid of |D|
    eps: 0.1                       # memorized when ratio >= 1 - eps
    metric: max                    # a run's ratio: max over snapshots (the papers) or final
    bootstrap: 1000                # replicates for EMM confidence intervals (0: none)
    grid:                          # factor -> values; the entries are the product of all factors
      num_channels: [8, 16, 32]
      labels: [none, unique]
      batch:                       # one factor may set several options per value
        - {batch: 64, lr: 1e-3}
        - {batch: 128, lr: 2e-3}

Each entry of the product is one EMM measurement. Entry order is deterministic (factors
in the order written, last factor fastest), so `--entry I` names the same entry in every
process, e.g. one Slurm array task each.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from ..training.config import PRESETS, TrainingConfig
from .search import SearchRange

METRICS = ("max", "final")
INTERPOLATIONS = ("linear", "log")
SPEC_KEYS = ("name", "base", "search", "sizes", "eps", "metric", "interpolation", "bootstrap", "grid")
# Columns of the result tables; a factor may not take one of these names.
TABLE_COLUMNS = ("index", "label", "emm", "lower", "upper", "bracketed", "monotone", "ci_low", "ci_high", "runs",
                 "status", "size", "ratio", "max_ratio", "final_ratio", "n_samples", "run_dir")
# Chosen per run by the sweep itself, or only about where/how a run executes.
RESERVED_OPTIONS = ("size", "outdir", "nosubdir")


@dataclasses.dataclass(frozen=True)
class SweepEntry:
    index: int
    factors: dict[str, Any]  # factor name -> the value as written in the spec
    options: dict[str, Any]  # training options this entry sets on top of the base

    @property
    def label(self) -> str:
        return ", ".join(f"{name}={format_value(value)}" for name, value in self.factors.items()) or "base"

    def display_factors(self) -> dict[str, str]:
        return {name: format_value(value) for name, value in self.factors.items()}


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    base: dict[str, Any]
    entries: tuple[SweepEntry, ...]
    factors: tuple[str, ...]
    search: SearchRange | None = None
    sizes: tuple[int, ...] | None = None
    eps: float = 0.1
    metric: str = "max"
    interpolation: str = "linear"  # of the ratio between the bracket's ends: in |D| or in log |D|
    bootstrap: int = 0
    name: str = "sweep"

    def config(self, entry: SweepEntry, size: int, outdir: str) -> TrainingConfig:
        """The training configuration of one run: base, preset expanded, entry options, |D|."""
        base = dict(self.base)
        preset = base.pop("preset", None)
        layers = [PRESETS[preset]] if preset is not None else []
        return TrainingConfig.layered(*layers, base, entry.options, dict(size=size, outdir=outdir, nosubdir=False),
                                      sources=(*([f"preset {preset}"] if preset else []), "sweep base",
                                               f"sweep entry {entry.label!r}", "sweep"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(name=self.name, base=self.base, eps=self.eps, metric=self.metric,
                                   interpolation=self.interpolation, bootstrap=self.bootstrap, grid={})
        if self.search is not None:
            out["search"] = dict(min=self.search.min_size, max=self.search.max_size, tolerance=self.search.tolerance)
        if self.sizes is not None:
            out["sizes"] = list(self.sizes)
        out["grid"] = _grid_of(self.entries, self.factors)
        return out


def format_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _grid_of(entries, factors) -> dict[str, list]:
    grid: dict[str, list] = {name: [] for name in factors}
    for entry in entries:
        for name in factors:
            if entry.factors[name] not in grid[name]:
                grid[name].append(entry.factors[name])
    return grid


def _options_of(factor: str, value: Any, where: str) -> dict[str, Any]:
    """The training options one factor value sets: {factor: value}, or the mapping itself."""
    options = dict(value) if isinstance(value, dict) else {factor: value}
    for key in options:
        if str(key).replace("-", "_") in RESERVED_OPTIONS:
            raise ValueError(f"{where}: option {key!r} cannot be swept (the sweep sets |D| and the output folder)")
    return options


def parse_spec(values: dict[str, Any], *, source: str = "sweep spec") -> SweepSpec:
    """Validate a sweep specification (a mapping, e.g. from YAML) and expand its grid."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: must be a mapping with keys such as base, grid, search or sizes")
    unknown = [key for key in values if key not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(SPEC_KEYS)}")
    base = values.get("base") or {}
    if not isinstance(base, dict):
        raise ValueError(f"{source}: 'base' must be a mapping of diffmem-train options")
    for key in base:
        if str(key).replace("-", "_") in RESERVED_OPTIONS:
            raise ValueError(f"{source}: base option {key!r} is set by the sweep; remove it "
                             "(use search/sizes for |D| and --outdir for the folder)")
    preset = base.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{source}: unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")

    eps = values.get("eps", 0.1)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
        raise ValueError(f"{source}: eps must be a number in (0, 1), got {eps!r}")
    metric = values.get("metric", "max")
    if metric not in METRICS:
        raise ValueError(f"{source}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    interpolation = values.get("interpolation", "linear")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{source}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    bootstrap = values.get("bootstrap", 0)
    if not (isinstance(bootstrap, int) and not isinstance(bootstrap, bool) and bootstrap >= 0):
        raise ValueError(f"{source}: bootstrap must be a non-negative integer, got {bootstrap!r}")

    has_search, has_sizes = values.get("search") is not None, values.get("sizes") is not None
    if has_search == has_sizes:
        raise ValueError(f"{source}: give exactly one of 'search' (adaptive EMM search: min, max, tolerance) "
                         "or 'sizes' (a fixed list of |D|)")
    search = sizes = None
    if has_search:
        s = values["search"]
        if not isinstance(s, dict) or not {"min", "max"} <= set(s) or not set(s) <= {"min", "max", "tolerance"}:
            raise ValueError(f"{source}: search must be a mapping with min, max and optionally tolerance, got {s!r}")
        try:
            search = SearchRange(_whole(s["min"], "search.min", source), _whole(s["max"], "search.max", source),
                                 float(s.get("tolerance", 0.25)), float(eps))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: search: {err}") from None
    else:
        raw = values["sizes"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{source}: sizes must be a non-empty list of |D|, got {raw!r}")
        sizes = tuple(sorted({_whole(v, "sizes", source) for v in raw}))
        if sizes[0] < 2:
            raise ValueError(f"{source}: every size must be at least 2 (NN1 and NN2 need 2 images), got {sizes[0]}")

    grid = values.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError(f"{source}: grid must map factor names to lists of values")
    factors = tuple(str(name) for name in grid)
    for name in factors:
        if name in TABLE_COLUMNS and name.replace("-", "_") not in RESERVED_OPTIONS:  # those fail below, more clearly
            raise ValueError(f"{source}: a grid factor cannot be named {name!r} (a column of the result tables); "
                             f"name it otherwise and set the option through a mapping, e.g. {name}_: "
                             f"[{{{name}: ...}}]")
    value_lists = []
    for name, options in grid.items():
        if not isinstance(options, list) or not options:
            raise ValueError(f"{source}: grid factor {name!r} needs a non-empty list of values, got {options!r}")
        if len({json.dumps(v, sort_keys=True) for v in options}) != len(options):
            raise ValueError(f"{source}: grid factor {name!r} lists a value twice")
        value_lists.append(options)

    entries = []
    for index, combination in enumerate(itertools.product(*value_lists)):
        chosen = dict(zip(factors, combination))
        options: dict[str, Any] = {}
        for name, value in chosen.items():
            options.update(_options_of(name, value, f"{source}: grid factor {name!r}"))
        entries.append(SweepEntry(index, chosen, options))

    spec = SweepSpec(base=dict(base), entries=tuple(entries), factors=factors, search=search, sizes=sizes,
                     eps=float(eps), metric=metric, interpolation=interpolation, bootstrap=bootstrap, name=str(values.get("name") or "sweep"))
    # Every entry's configuration must be valid before anything is trained.
    first_size = search.min_size if search is not None else sizes[0]
    for entry in spec.entries:
        try:
            config = spec.config(entry, first_size, "unused")
        except ValueError as err:
            raise ValueError(f"{source}: entry {entry.index} ({entry.label}): {err}") from None
        if config.samples <= 0 or config.eval == "none":
            raise ValueError(f"{source}: entry {entry.index} ({entry.label}): EMM needs evaluated runs; "
                             "--samples must be positive and --eval not none")
    return spec


def _whole(value: Any, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{source}: {what} must be whole numbers of training images, got {value!r}")
    return int(value)
