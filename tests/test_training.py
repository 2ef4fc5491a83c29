"""Tests of diffmem.training: durations, warm-up, EMA rules against the reference formulas,
the data order, atomic and weights_only checkpoints, bit-exact resume, and DDP gradients
on two gloo processes. Tiny networks on 8x8 digits keep the whole file fast on a CPU."""
import json
import math
import os
import pathlib
import signal

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffmem.training import (
    EMA,
    CyclicOrder,
    TrainingConfig,
    TrainingInterrupted,
    build_dataset,
    checkpoint,
    ema_beta,
    learning_rate,
    load_denoiser,
    parse_duration,
    resolve_schedule,
    train,
)
from diffmem.training.loop import nan_to_num_gradients
from diffmem.training import distributed

TINY = dict(
    data="digits", size=32, subset="first", num_channels=8, num_blocks=1, channel_mult=[1, 2],
    attn_resolutions=[], dropout=0.1, lr=1e-3, batch=16, duration="12steps", lr_rampup="4steps",
    ema="0.1kimg", ema_mode="mode1", snapshots="1", samples=0, device="cpu", progress=False, threads=1,
)


def tiny_config(**changes) -> TrainingConfig:
    return TrainingConfig.from_dict({**TINY, **changes})


# ---------------------------------------------------------------------------------------
# Durations and warm-up


@pytest.mark.parametrize("text, size, batch, nimg", [
    ("2000", 1000, 512, 40_000_000),      # reference units: duration * |D| / 50 kimg = 40,000 epochs
    ("40000ep", 1000, 512, 40_000_000),
    ("512kimg", 64, 64, 512_000),
    ("2.5Mimg", 64, 64, 2_500_000),
    ("100000img", 64, 64, 100_000),
    ("300steps", 64, 32, 9_600),
    ("2e3", 1000, 512, 40_000_000),
    ("600", 50_000, 512, 600_000_000),    # EDM's CIFAR-10: 600 Mimg
])
def test_duration_units(text, size, batch, nimg):
    assert parse_duration(text).to_nimg(size, batch) == nimg


def test_reference_units_truncate_to_whole_kimg():
    # int(duration * |D| / 50) kimg, as train.py computes total_kimg, ema and warm-up.
    assert parse_duration("0.5").to_nimg(64, 64) == 0          # int(0.64) = 0 kimg
    assert parse_duration("0.5").to_nimg(1000, 512) == 10_000  # 10 epochs
    assert parse_duration("10").to_nimg(1000, 512) == 200_000  # int(|D| / 5) kimg
    assert parse_duration("10").to_nimg(64, 64) == 12_000      # int(12.8)
    assert parse_duration("0.5").to_nimg(64, 64, truncate_to_kimg=False) == 640


@pytest.mark.parametrize("bad", ["", "abc", "-5", "0", "10parsecs", "1.5steps", "nan", "1e999", True])
def test_duration_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_schedule_resolution():
    sched = resolve_schedule(dataset_size=1000, batch_size=512, batch_gpu=None, world_size=8, duration="2000",
                             lr_rampup="10", ema_halflife="0.5", ema_mode="mode2", snapshots="2500kimg")
    assert sched.total_nimg == 40_000_000 and sched.total_steps == math.ceil(40_000_000 / 512)
    assert sched.lr_rampup_nimg == 200_000 and sched.ema_halflife_nimg == 10_000
    assert sched.batch_per_round == 64 and sched.accumulation_rounds == 1
    assert sched.snapshot_nimg == 2_500_000 and sched.data_ratio == 50
    # A tiny run: at least one kimg (the reference's max(..., 1)), snapshots by count.
    small = resolve_schedule(dataset_size=10, batch_size=64, batch_gpu=16, world_size=2, duration="1",
                             lr_rampup="0", ema_halflife="0.5", ema_mode="mode4", snapshots="4")
    assert small.total_nimg == 1000 and small.snapshot_nimg == 250
    assert small.batch_per_round == 16 and small.accumulation_rounds == 2
    assert small.ema_halflife_nimg == 100  # mode4 keeps the half-life exact (10 epochs)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_schedule(dataset_size=10, batch_size=63, batch_gpu=None, world_size=2, duration="1",
                         lr_rampup="0", ema_halflife="0.5", ema_mode="mode2", snapshots="1")


def test_learning_rate_warmup():
    assert learning_rate(2e-4, 0, 200_000) == 0.0  # the reference's first step has lr 0
    assert learning_rate(2e-4, 50_000, 200_000) == pytest.approx(5e-5)
    assert learning_rate(2e-4, 200_000, 200_000) == 2e-4
    assert learning_rate(2e-4, 10**9, 200_000) == 2e-4
    assert learning_rate(1e-3, 512, 0) == 1e-3  # no warm-up


# ---------------------------------------------------------------------------------------
# EMA


def reference_beta(mode, cur_nimg, batch_size, ema_halflife_kimg, data_ratio, final_ema, ema_rampup_ratio=0.05):
    """DiffMemorize training_loop.py, transcribed."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    if mode == "mode1":
        return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    if mode == "mode2":
        return 0.5 ** (512 / max(ema_halflife_nimg, 1e-8) / data_ratio)
    if mode == "mode3":
        return 0.5 ** (batch_size / 500 / 1000)
    ema_constant = 0.5 ** (batch_size / 500 / 1000)
    return final_ema / ema_constant * (0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8) / data_ratio))


@pytest.mark.parametrize("mode", ["mode1", "mode2", "mode3", "mode4"])
@pytest.mark.parametrize("size, batch", [(1000, 512), (2000, 128), (50_000, 512)])
@pytest.mark.parametrize("cur_nimg", [0, 512, 100_000, 10**8])
def test_ema_beta_matches_reference(mode, size, batch, cur_nimg):
    halflife_kimg = int(0.5 * size / 50)
    ours = ema_beta(mode, cur_nimg=cur_nimg, batch_size=batch, halflife_nimg=halflife_kimg * 1000,
                    rampup_ratio=0.05, data_ratio=50_000 / size, final_ema=0.999)
    assert ours == pytest.approx(reference_beta(mode, cur_nimg, batch, halflife_kimg, 50_000 / size, 0.999), rel=1e-12)


def test_ema_mode2_settles_at_099929_for_every_size_and_batch():
    for size in (500, 1000, 5000, 50_000):
        for batch in (128, 512, 896):
            sched = resolve_schedule(dataset_size=size, batch_size=batch, batch_gpu=None, world_size=1,
                                     duration="2000", lr_rampup="10", ema_halflife="0.5", ema_mode="mode2",
                                     snapshots="1")
            beta = ema_beta("mode2", cur_nimg=10**9, batch_size=batch, halflife_nimg=sched.ema_halflife_nimg,
                            rampup_ratio=0.05, data_ratio=sched.data_ratio)
            assert beta == pytest.approx(0.5 ** (512 / 500_000), rel=1e-12)
    assert 0.5 ** (512 / 500_000) == pytest.approx(0.99929, abs=1e-5)


def test_ema_halflife_rampup():
    # Half-life min(10 kimg, 0.05 * cur_nimg): at 100 kimg seen it is 5 kimg.
    beta = ema_beta("mode1", cur_nimg=100_000, batch_size=512, halflife_nimg=10_000, rampup_ratio=0.05, data_ratio=50)
    assert beta == pytest.approx(0.5 ** (512 / 5_000))
    assert ema_beta("mode1", cur_nimg=0, batch_size=512, halflife_nimg=10_000, rampup_ratio=0.05, data_ratio=50) == 0.0
    no_ramp = ema_beta("mode1", cur_nimg=0, batch_size=512, halflife_nimg=10_000, rampup_ratio=None, data_ratio=50)
    assert no_ramp == pytest.approx(0.5 ** (512 / 10_000))


@pytest.mark.parametrize("size", [64, 1000, 3000])
def test_ema_mode4_is_final_ema_after_rampup(size):
    config = tiny_config(ema="beta:0.99", batch=32)
    mode, halflife, final = config.ema_settings()
    sched = resolve_schedule(dataset_size=size, batch_size=32, batch_gpu=None, world_size=1, duration="2000",
                             lr_rampup="10", ema_halflife=halflife, ema_mode=mode, snapshots="1")
    after = ema_beta(mode, cur_nimg=10**9, batch_size=32, halflife_nimg=sched.ema_halflife_nimg, rampup_ratio=0.05,
                     data_ratio=sched.data_ratio, final_ema=final)
    during = ema_beta(mode, cur_nimg=1000, batch_size=32, halflife_nimg=sched.ema_halflife_nimg, rampup_ratio=0.05,
                      data_ratio=sched.data_ratio, final_ema=final)
    assert (mode, final) == ("mode4", 0.99)
    assert after == pytest.approx(0.99, rel=1e-12)
    assert during < after


def test_ema_update_is_the_weighted_average():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 0.9)
    for b, p_ema, p_net in zip(before, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * b + 0.1 * p_net)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ---------------------------------------------------------------------------------------
# Data order


def test_data_order_is_one_shuffle_cycled():
    order = CyclicOrder(10, seed=1024)
    expected = np.arange(10)
    np.random.RandomState(1024).shuffle(expected)  # EDM InfiniteSampler, window_size=0
    stream = np.concatenate([order.indices(step, 4) for step in range(10)])
    np.testing.assert_array_equal(stream, np.tile(expected, 4))


def test_data_order_same_global_batches_with_two_processes():
    single = CyclicOrder(37, seed=5)
    ranks = [CyclicOrder(37, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(12):
        together = np.concatenate([o.indices(step, 4) for o in ranks])
        np.testing.assert_array_equal(np.sort(together), np.sort(single.indices(step, 8)))
        # Accumulation rounds split a process's share without changing it.
        rounds = np.concatenate([ranks[0].indices(step, 4, r, 2) for r in range(2)])
        np.testing.assert_array_equal(rounds, ranks[0].indices(step, 4))


# ---------------------------------------------------------------------------------------
# Checkpoints


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_leaves_old_file_and_no_partial(tmp_path):
    target = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"x": torch.arange(3)}, target)
    big = {"a": torch.zeros(1 << 20), "b": _Unpicklable()}  # fails after writing some bytes
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_atomic(big, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(checkpoint.load(target)["x"], torch.arange(3))
    with pytest.raises(OSError):
        checkpoint.save_atomic({"x": 1}, tmp_path / "missing" / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _state_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bit_identical_and_checkpoints_load_weights_only(tmp_path):
    config = tiny_config(snapshots="2", duration="80steps", tick="8steps")  # 2 snapshots >= 1 kimg apart
    dataset = build_dataset(config)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    full = train(config, dataset, tmp_path / "a")

    def interrupt(step, nimg):
        if step == 29:  # between the two snapshots, not on a tick
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(config, dataset, tmp_path / "b", on_step=interrupt)
    assert info.value.signum == signal.SIGINT and info.value.nimg == 29 * 16
    partial = checkpoint.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert partial["step"] == 29 and not partial["done"]
    resumed = train(config, dataset, tmp_path / "b", resume=True)

    assert full.snapshots == resumed.snapshots == ["snapshot-000000.pt", "snapshot-000001.pt"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["done"] and b["done"] and a["step"] == b["step"] == 80
    for key in ("net", "ema", "optimizer", "rng"):
        _state_equal(a[key], b[key], key)
    for name in full.snapshots:
        snap_a = torch.load(tmp_path / "a" / "snapshots" / name, weights_only=True)
        snap_b = torch.load(tmp_path / "b" / "snapshots" / name, weights_only=True)
        _state_equal(snap_a["ema"], snap_b["ema"], name)
    # The resumed log has no duplicated ticks and ends like the uninterrupted one.
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in log_a] == [r["nimg"] for r in log_b]
    assert [(r["loss"], r["lr"], r["ema_beta"]) for r in log_a] == [(r["loss"], r["lr"], r["ema_beta"]) for r in log_b]
    assert {"kimg", "loss", "lr", "img_per_s", "time"} <= set(log_a[0])

    # A snapshot rebuilds into a working denoiser without its config.
    denoiser, meta = load_denoiser(tmp_path / "a" / "snapshots" / full.snapshots[-1])
    assert meta["nimg"] == 80 * 16 and not denoiser.training
    out = denoiser(torch.zeros(2, 1, 8, 8), torch.ones(2))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()

    # Resuming with other training settings is refused; finished runs return at once.
    with pytest.raises(ValueError, match="--lr"):
        train(config.replace(lr=5e-4), dataset, tmp_path / "b", resume=True)
    assert train(config, dataset, tmp_path / "b", resume=True).steps == 80


def test_nan_gradients_are_replaced():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.5])
    untouched = torch.nn.Parameter(torch.zeros(1))
    nan_to_num_gradients([param, untouched])
    assert param.grad.tolist() == [0.0, 1e5, -1e5, 2.5] and untouched.grad is None


def test_bf16_channels_last_adamw_conditional_edm_train(tmp_path):
    # bf16 autocast + channels_last + AdamW with decay: a few steps stay finite.
    config = tiny_config(precision="bf16", channels_last=True, optimizer="adamw", weight_decay=0.01,
                         duration="3steps", cond=True, labels="true", precond="edm")
    dataset = build_dataset(config)
    train(config, dataset, tmp_path)
    state = checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())
    assert state["network"]["label_dim"] == 10


# ---------------------------------------------------------------------------------------
# Data parallel on two gloo processes


def _fixed_noise_batch(batch):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(batch, 1, 8, 8, generator=gen)
    sigma = torch.rand(batch, generator=gen) * 3 + 0.05
    return images, noise, sigma


def _gradients(net, images, noise, sigma, per_process):
    """The loop's normalization: sum over this process's images / per-process batch."""
    out = net(images + noise * sigma.reshape(-1, 1, 1, 1), sigma)
    loss = ((out - images) ** 2 / sigma.reshape(-1, 1, 1, 1) ** 2).sum() / per_process
    loss.backward()


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    device = torch.device("cpu")
    distributed.init(device, init_method=f"file://{init_file}", rank_=rank, world_size_=world)
    try:
        from diffmem.training.model import build_denoiser, network_spec

        config = tiny_config(dropout=0.0)
        torch.manual_seed(0)
        net = build_denoiser(network_spec(config, 8, 1, 0))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        images, noise, sigma = _fixed_noise_batch(8)
        # Rank r takes stream positions r, r + 2, ... (CyclicOrder's split).
        _gradients(ddp, images[rank::world], noise[rank::world], sigma[rank::world], per_process=8 // world)
        if rank == 0:
            torch.save({n: p.grad for n, p in net.named_parameters()}, os.path.join(out_dir, "ddp_grads.pt"))

        # The real loop under DDP: every process ends with the same weights.
        run_dir = pathlib.Path(out_dir) / "run"
        if rank == 0:
            run_dir.mkdir()
        distributed.barrier()
        result = train(tiny_config(duration="4steps", batch=8), build_dataset(tiny_config()), run_dir)
        flat = torch.cat([p.detach().flatten() for p in [*result.net.parameters(), *result.ema.parameters()]])
        gathered = distributed.gather_objects(flat)
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "ddp_params.pt"))
        # Nothing may still hold the process group when it is destroyed, and both processes
        # get there before either tears it down (a gloo process once aborted at exit in CI).
        del ddp, result
        distributed.barrier()
    finally:
        distributed.shutdown()


def test_ddp_two_gloo_processes_average_gradients(tmp_path):
    from diffmem.training.model import build_denoiser, network_spec

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)

    torch.manual_seed(0)
    net = build_denoiser(network_spec(tiny_config(dropout=0.0), 8, 1, 0))
    images, noise, sigma = _fixed_noise_batch(8)
    _gradients(net, images, noise, sigma, per_process=8)
    for name, param in net.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in ddp_grads.values())

    params = torch.load(tmp_path / "ddp_params.pt", weights_only=True)
    assert len(params) == 2 and torch.equal(params[0], params[1])
    state = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(state["rng"]) == 2 and state["step"] == 4
