"""TrainingConfig: every option of a training run, from defaults, a preset, a YAML/JSON
file and command-line flags (later sources override earlier ones), validated in one place.

The defaults are DiffMemorize's basic configuration (Gu et al. 2023, scripts/*.md):
unconditional DDPM++ with VP preconditioning, 128 channels, 2 blocks, channel_mult 2,2,2,
attention at 16x16, dropout 0.13, Adam lr 2e-4, batch 512, duration 2000 (= 40,000
epochs), EMA half-life 0.5 in mode2, training seed 1024, fp32.

Field names are the flag names with '-' for '_': `num_channels` in a file is
`--num-channels` on the command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

from . import schedule as schedule_module
from .ema import EMA_MODES

LABEL_MODES = ("none", "true", "random", "unique")
SUBSETS = ("balanced", "first")
ARCHS = ("ddpmpp", "ncsnpp")
PRECONDS = ("vp", "ve", "edm")
EMBEDS = ("positional", "fourier")
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("fp32", "tf32", "bf16")
SAMPLERS = ("heun", "euler")
EVAL_WHEN = ("end", "each", "none")

# Settings tuned so that a tiny DDPM++ (EDM preconditioning) memorizes 64 digits on a 2-core CPU within a few
# minutes, evaluation included (see the report in the project's history for measurements).
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": dict(
        data="digits", size=64, subset="first", arch="ddpmpp", precond="edm",
        num_channels=16, num_blocks=1, channel_mult=[1, 1], attn_resolutions=[], dropout=0.0,
        lr=3e-3, batch=128, duration="3375steps", lr_rampup="100ep", ema="50ep", ema_mode="mode1",
        snapshots="2", samples=1000, sample_batch=1000, steps=18, device="cpu", threads=1,
    ),
    # The same network with the papers' VP preconditioning: it memorizes more slowly per
    # epoch than EDM's, so it needs a larger batch, a higher learning rate and ~9,600 epochs
    # (measured: ratio 0.921 in 239-275 s on 1 thread of a shared 2-core CPU, evaluation
    # included; 0.896 at 8,800 epochs with lr 6e-3).
    "quickstart-vp": dict(
        data="digits", size=64, subset="first", arch="ddpmpp", precond="vp",
        num_channels=16, num_blocks=1, channel_mult=[1, 1], attn_resolutions=[], dropout=0.0,
        lr=5e-3, batch=256, duration="2400steps", lr_rampup="100ep", ema="50ep", ema_mode="mode1",
        snapshots="4", samples=1000, sample_batch=1000, steps=18, device="cpu", threads=1,
    ),
    # For EMM searches on the CPU (diffmem emm): the quickstart network with the same
    # compute at every |D| (1,500 steps of 128; warm-up and EMA in images, not epochs), so
    # memorization falls as |D| grows; one snapshot, 1,000 samples.
    "emm-digits": dict(
        data="digits", subset="first", arch="ddpmpp", precond="edm",
        num_channels=16, num_blocks=1, channel_mult=[1, 1], attn_resolutions=[], dropout=0.0,
        lr=3e-3, batch=128, duration="1500steps", lr_rampup="12.8kimg", ema="3.2kimg", ema_mode="mode1",
        snapshots="1", samples=1000, sample_batch=1000, steps=18, device="cpu", threads=1,
    ),
}


def _opt(kind: str, help: str, default: Any = None, choices: tuple | None = None, **extra) -> Any:
    """A config field with its value kind (for coercion) and help text (for the CLI)."""
    meta = dict(kind=kind, help=help, choices=choices, **extra)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    # Training set.
    data: str | None = _opt("str", "dataset: digits | cifar10 | cifar10:PATH | PATH.npz | PATH.zip | DIR")
    data_root: str | None = _opt("str", "CIFAR-10 location (torchvision root or .npz) for --data cifar10")
    size: int | None = _opt("int", "|D|, the number of training images (default: all)")
    subset: str = _opt("str", "how |D| images are chosen: balanced = the reference's class-balanced "
                       "rule, first = the first |D| in file order", "balanced", SUBSETS)
    resolution: int | None = _opt("int", "resize the images to this resolution (PIL LANCZOS)")
    labels: str | None = _opt("str", "class labels (default: true if --cond 1, else none)", None, LABEL_MODES)
    num_classes: int | None = _opt("int", "classes for --labels random; class-diversity subset for true/none")
    cond: bool | None = _opt("bool", "class-conditional model (default: 1 exactly when --labels is not none)")

    # Network.
    arch: str = _opt("str", "network architecture", "ddpmpp", ARCHS)
    precond: str = _opt("str", "preconditioning and loss", "vp", PRECONDS)
    num_channels: int = _opt("int", "base channel count (model_channels)", 128)
    num_blocks: int = _opt("int", "residual blocks per resolution", 2)
    channel_mult: list = _opt("int_list", "channels per resolution, x num_channels (e.g. 2,2,2)", [2, 2, 2])
    attn_resolutions: list = _opt("int_list", "resolutions with self-attention (e.g. 16; 'none' for none)", [16])
    embed: str | None = _opt("str", "noise embedding (default: positional for ddpmpp, fourier for ncsnpp)", None, EMBEDS)
    skip_connections: list | None = _opt("int_list", "0/1 per encoder output, (num_blocks+1) * len(channel_mult) "
                                         "entries (default: all 1)")
    dropout: float = _opt("float", "dropout probability", 0.13)

    # Optimization.
    optimizer: str = _opt("str", "adam = Adam with coupled L2 weight decay (the reference); adamw = decoupled",
                          "adam", OPTIMIZERS)
    lr: float = _opt("float", "learning rate", 2e-4)
    weight_decay: float = _opt("float", "weight decay", 0.0)
    batch: int = _opt("int", "global batch size (all processes)", 512)
    batch_gpu: int | None = _opt("int", "limit the batch per process per pass; gradients are accumulated")
    duration: str = _opt("duration", "training length: reference units (Mimg at |D|=50k, 2000 = 40,000 epochs) "
                         "or with a unit: 40000ep, 512kimg, 2.5Mimg, 300steps", "2000")
    lr_rampup: str = _opt("duration", "linear learning-rate warm-up, same units (default 10 = int(|D|/5) kimg)", "10")
    ema: str = _opt("str", "EMA half-life in reference units (0.5 = 10 epochs) or with a unit (10ep, 5kimg), "
                    "or beta:B for a fixed decay B per step after ramp-up (mode4)", "0.5")
    ema_mode: str = _opt("str", "EMA rule (see diffmem.training.ema)", "mode2", EMA_MODES)
    final_ema: float = _opt("float", "decay per step after ramp-up in mode4", 0.99929)
    ema_rampup: float | None = _opt("float", "EMA half-life ramp-up ratio ('none' to disable)", 0.05)
    seed: int = _opt("int", "random seed (network init, data order, noise)", 1024)

    # Performance.
    device: str = _opt("str", "auto | cpu | cuda | cuda:N", "auto")
    precision: str = _opt("str", "fp32 (TF32 off, as the reference) | tf32 | bf16 autocast", "fp32", PRECISIONS)
    channels_last: bool = _opt("bool", "channels-last memory format", False)
    compile: bool = _opt("bool", "torch.compile the network for training", False)
    threads: int | None = _opt("int", "CPU threads for PyTorch (default: PyTorch's choice); 1 is fastest for tiny "
                               "models, and on a CPU shared with other jobs")

    # Output.
    outdir: str = _opt("str", "parent folder of the run directory", "training-runs")
    nosubdir: bool = _opt("bool", "write into --outdir itself instead of a subfolder named after the config", False)
    snapshots: str = _opt("str", "snapshot count (e.g. 4, evenly spread) or interval (e.g. 2500kimg, 500ep)", "2500kimg")
    tick: str | None = _opt("duration", "progress-log interval (default: 50kimg, at most 1/20 of the run)")
    checkpoint_minutes: float = _opt("float", "also write checkpoint.pt this often (minutes; 0 = only at "
                                     "snapshots, the end and interruption)", 10.0)
    progress: bool = _opt("bool", "show a progress bar", True)

    # Evaluation of the snapshots.
    samples: int = _opt("int", "samples per snapshot for the memorization ratio, seeds 0..N-1 (0 = no evaluation)", 10000)
    sample_batch: int = _opt("int", "sampling batch size", 512)
    steps: int = _opt("int", "sampler steps (Heun: 2*steps-1 network evaluations)", 18)
    sampler: str = _opt("str", "ODE sampler", "heun", SAMPLERS)
    eval: str = _opt("str", "evaluate snapshots at the end, after each snapshot, or not at all", "end", EVAL_WHEN)
    grid_rows: int = _opt("int", "rows of [sample | NN1 | NN2] in the PNG grids", 16)

    # ---------------------------------------------------------------------------------
    # Construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainingConfig":
        """Coerce and validate. Keys may use '-' or '_'."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ValueError(f"{source}: unknown option {key!r}")
            kwargs[name] = _coerce(name, value, fields[name].metadata["kind"])
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def layered(cls, *layers: dict[str, Any], sources: tuple[str, ...] | None = None) -> "TrainingConfig":
        """Defaults, then each layer in turn (preset, file, command line)."""
        merged: dict[str, Any] = {}
        for i, layer in enumerate(layers):
            source = sources[i] if sources else "config"
            for key, value in layer.items():
                name = str(key).replace("-", "_")
                if name not in cls.field_names():
                    raise ValueError(f"{source}: unknown option {key!r}")
                merged[name] = value
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainingConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ---------------------------------------------------------------------------------
    # Derived settings

    @property
    def label_mode(self) -> str:
        if self.labels is not None:
            return self.labels
        return "true" if self.cond else "none"

    @property
    def conditional(self) -> bool:
        return self.label_mode != "none"

    @property
    def ema_is_fixed_beta(self) -> bool:
        return self.ema.strip().lower().startswith("beta:")

    def ema_settings(self) -> tuple[str, str, float]:
        """(mode, half-life spec, final_ema). 'beta:B' means mode4 with final_ema B over the
        reference's default half-life 0.5."""
        if self.ema_is_fixed_beta:
            return "mode4", "0.5", float(self.ema.split(":", 1)[1])
        return self.ema_mode, self.ema, self.final_ema

    def schedule(self, dataset_size: int, world_size: int = 1) -> schedule_module.TrainingSchedule:
        mode, halflife, _ = self.ema_settings()
        return schedule_module.resolve_schedule(
            dataset_size=dataset_size, batch_size=self.batch, batch_gpu=self.batch_gpu, world_size=world_size,
            duration=self.duration, lr_rampup=self.lr_rampup, ema_halflife=halflife, ema_mode=mode,
            snapshots=self.snapshots, tick=self.tick,
        )

    # Options that change what is trained. A run directory is named after them, and
    # resuming with different values is refused; the rest (output, performance and
    # evaluation options) may change between sessions.
    TRAINING_KEYS = (
        "data", "size", "subset", "resolution", "labels", "num_classes", "cond", "arch", "precond",
        "num_channels", "num_blocks", "channel_mult", "attn_resolutions", "embed", "skip_connections",
        "dropout", "optimizer", "lr", "weight_decay", "batch", "duration", "lr_rampup", "ema", "ema_mode",
        "final_ema", "ema_rampup", "seed", "precision", "snapshots",
    )

    def training_identity(self) -> dict[str, Any]:
        values = self.to_dict()
        identity = {key: values[key] for key in self.TRAINING_KEYS}
        identity["labels"] = self.label_mode
        identity["cond"] = self.conditional
        return identity

    def run_name(self) -> str:
        """A deterministic directory name: readable settings plus a hash of every option
        that changes training, so equal configs share a directory and different ones never do."""
        identity = self.training_identity()
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        data = re.sub(r"[^A-Za-z0-9]+", "_", pathlib.Path(str(self.data).split(":", 1)[0]).stem).strip("_") or "data"
        size = self.size if self.size is not None else "all"
        cond = "cond" if self.conditional else "uncond"
        return f"{data}-{size}-{cond}-{self.arch}-{self.precond}-c{self.num_channels}-b{self.batch}-{digest}"

    def run_dir(self) -> pathlib.Path:
        outdir = pathlib.Path(self.outdir)
        return outdir if self.nosubdir else outdir / self.run_name()

    # ---------------------------------------------------------------------------------
    # Validation

    def validate(self) -> None:
        """Raises ValueError, naming the flag, for any invalid or inconsistent value."""
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ValueError(f"{_flag(name)} {why}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")

        need(self.data is not None and str(self.data).strip() != "", "data", "is required (e.g. --data digits)")
        need(self.size is None or self.size >= 1, "size", f"must be at least 1, got {self.size}")
        need(self.resolution is None or self.resolution >= 1, "resolution", f"must be positive, got {self.resolution}")
        need(self.num_classes is None or self.num_classes >= 1, "num_classes", f"must be at least 1, got {self.num_classes}")
        if self.cond is not None and self.labels is not None:
            need(self.cond == (self.labels != "none"), "cond",
                 f"{int(self.cond)} contradicts --labels {self.labels} (labels other than none need --cond 1)")

        need(self.num_channels >= 1, "num_channels", f"must be positive, got {self.num_channels}")
        need(self.num_blocks >= 1, "num_blocks", f"must be at least 1, got {self.num_blocks}")
        need(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), "channel_mult",
             f"must be a non-empty list of positive integers, got {self.channel_mult}")
        need(all(r >= 1 for r in self.attn_resolutions), "attn_resolutions", f"must be positive, got {self.attn_resolutions}")
        need(self.num_channels >= 4, "num_channels", f"must be at least 4 (GroupNorm), got {self.num_channels}")
        if self.skip_connections is not None:
            expected = (self.num_blocks + 1) * len(self.channel_mult)
            need(len(self.skip_connections) == expected, "skip_connections",
                 f"has {len(self.skip_connections)} entries; expected (num_blocks + 1) * len(channel_mult) = "
                 f"({self.num_blocks} + 1) * {len(self.channel_mult)} = {expected}")
            need(all(v in (0, 1) for v in self.skip_connections), "skip_connections",
                 f"entries must be 0 or 1, got {self.skip_connections}")
        need(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")

        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(self.weight_decay >= 0, "weight_decay", f"must be non-negative, got {self.weight_decay}")
        need(self.batch >= 1, "batch", f"must be at least 1, got {self.batch}")
        need(self.batch_gpu is None or self.batch_gpu >= 1, "batch_gpu", f"must be at least 1, got {self.batch_gpu}")
        schedule_module.parse_duration(self.duration, what="--duration")
        schedule_module.parse_duration(self.lr_rampup, what="--lr-rampup", allow_zero=True)
        if self.ema_is_fixed_beta:
            try:
                beta = float(self.ema.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"--ema beta:B needs a number B in [0, 1], got {self.ema!r}") from None
            need(0 <= beta <= 1, "ema", f"beta must lie in [0, 1], got {beta}")
        else:
            schedule_module.parse_duration(self.ema, what="--ema", allow_zero=True)
        need(0 <= self.final_ema <= 1, "final_ema", f"must lie in [0, 1], got {self.final_ema}")
        need(self.ema_rampup is None or self.ema_rampup >= 0, "ema_rampup", f"must be non-negative, got {self.ema_rampup}")
        need(0 <= self.seed < 2**63, "seed", f"must be a non-negative integer, got {self.seed}")

        need(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None, "device",
             f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(str(self.outdir).strip() != "", "outdir", "must not be empty")
        schedule_module.parse_snapshots(self.snapshots)
        if self.tick is not None:
            schedule_module.parse_duration(self.tick, what="--tick")
        need(self.checkpoint_minutes >= 0, "checkpoint_minutes", f"must be non-negative, got {self.checkpoint_minutes}")

        need(self.threads is None or self.threads >= 1, "threads", f"must be at least 1, got {self.threads}")
        need(self.samples >= 0, "samples", f"must be non-negative, got {self.samples}")
        need(self.sample_batch >= 1, "sample_batch", f"must be at least 1, got {self.sample_batch}")
        need(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        need(self.grid_rows >= 0, "grid_rows", f"must be non-negative, got {self.grid_rows}")

    def unet_levels(self, resolution: int) -> list[int]:
        """The image side at each level of the U-Net (one level per channel_mult entry)."""
        return [resolution >> i for i in range(len(self.channel_mult))]

    def attention_missing_levels(self, resolution: int) -> list[int]:
        """The --attn-resolutions no level has at this image side: they add no attention
        (as in EDM, silently there; diffmem-train says so)."""
        levels = self.unet_levels(resolution)
        return [r for r in self.attn_resolutions if r not in levels]

    def check_dataset(self, resolution: int, height: int, width: int) -> None:
        """Checks that need the loaded training set: a square image whose side halves
        cleanly at every level of the U-Net."""
        if height != width:
            raise ValueError(f"the U-Net needs square images; the training set is {height}x{width} (use --resolution)")
        levels = len(self.channel_mult)
        if resolution % (1 << (levels - 1)):
            raise ValueError(
                f"--channel-mult has {levels} levels, so the resolution must be divisible by {1 << (levels - 1)}; "
                f"the training set is {resolution}x{resolution}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, kind: str) -> Any:
    """A value from a file or the command line, as the field's type. Raises ValueError."""
    flag = _flag(name)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and kind in ("int", "float", "duration"):
        return None  # e.g. --ema-rampup none, --size none; 'none' stays a word for --labels
    try:
        if kind == "str":
            if isinstance(value, (list, dict)):
                raise ValueError
            return str(value)
        if kind == "duration":
            if isinstance(value, (bool, list, dict)):
                raise ValueError
            return str(value).strip()
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if value != int(value):
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError
            return number
        if kind == "int_list":
            if isinstance(value, str):
                text = value.strip()
                if text.lower() in ("", "none", "[]"):
                    return [] if name != "skip_connections" else None
                items = [item.strip() for item in text.strip("[]").split(",")]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                items = [value]
            else:
                raise ValueError
            out = []
            for item in items:
                if isinstance(item, bool) or isinstance(item, float):
                    raise ValueError
                out.append(int(str(item).strip()))
            return out
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(kind)
    expected = {"int": "an integer", "float": "a number", "bool": "0 or 1", "int_list": "a comma-separated list of integers",
                "str": "a string", "duration": "a duration such as 2000, 40000ep or 512kimg"}[kind]
    raise ValueError(f"{flag} must be {expected}, got {value!r}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML or JSON file (a mapping of option names to values)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise OSError(f"cannot read config file {os.fspath(path)!r}: {err.strerror or err}") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {err}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"reading the YAML config {os.fspath(path)!r} needs pyyaml (pip install pyyaml), "
                             "or write it as .json") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise ValueError(f"config file {os.fspath(path)!r} is not valid YAML: {reason}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {os.fspath(path)!r} must hold a mapping of option names to values, "
                         f"got {type(values).__name__}")
    return values
