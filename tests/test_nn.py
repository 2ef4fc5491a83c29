"""diffmem.nn: EDM's SongUNet (DDPM++ / NCSN++) with DiffMemorize's skip mask."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffmem.nn import SongUNet, configs, count_parameters
from diffmem.nn.embedding import FourierEmbedding, PositionalEmbedding
from diffmem.nn.layers import Conv2d, attention_weights
from diffmem.nn.unet_block import UNetBlock


def meta_count(**kwargs) -> int:
    with torch.device("meta"):  # no memory, no init work: the 220M-parameter nets are instant
        return count_parameters(SongUNet(**kwargs))


def tiny(**overrides) -> dict:
    """An 8x8 two-level net, small enough to run in milliseconds."""
    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    kwargs.update(overrides)
    return kwargs


def wake_up_(net: torch.nn.Module) -> torch.nn.Module:
    """Undo EDM's near-zero (1e-5) init of conv1 / proj / aux_conv so that every path
    visibly reaches the output."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                p.mul_(1e5)
    return net


def inputs(kwargs: dict, batch: int = 2, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    res, cin = kwargs["img_resolution"], kwargs["in_channels"]
    x = torch.randn(batch, cin, res, res, generator=gen, dtype=dtype)
    noise = torch.randn(batch, generator=gen, dtype=dtype)
    label_dim = kwargs.get("label_dim", 0)
    labels = None
    if label_dim:
        labels = F.one_hot(torch.arange(batch) % label_dim, label_dim).to(dtype)
    augment_dim = kwargs.get("augment_dim", 0)
    augment = torch.randn(batch, augment_dim, generator=gen, dtype=dtype) if augment_dim else None
    return x, noise, labels, augment


# ---------------------------------------------------------------------------------------
# Parameter counts of the CIFAR-10 networks (EDM / DiffMemorize).

CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, channel_mult=[2, 2, 2], attn_resolutions=[16])


@pytest.mark.parametrize("width, want", [(128, 35_125_251), (192, 78_984_195),
                                         (256, 140_374_019), (320, 219_294_723)])
def test_ddpmpp_width_counts(width, want):
    assert meta_count(**configs.ddpmpp(**CIFAR, model_channels=width, num_blocks=2)) == want


@pytest.mark.parametrize("blocks, want", [(4, 55_732_739), (6, 76_340_227), (8, 96_947_715),
                                          (10, 117_555_203), (12, 138_162_691)])
def test_ddpmpp_depth_counts(blocks, want):
    assert meta_count(**configs.ddpmpp(**CIFAR, model_channels=128, num_blocks=blocks)) == want


def test_ncsnpp_and_conditional_counts():
    assert meta_count(**configs.ncsnpp(**CIFAR, model_channels=128, num_blocks=2)) == 35_788_035
    assert meta_count(**configs.ddpmpp(**CIFAR, model_channels=128, num_blocks=4, label_dim=50_000)) == 62_132_867


def test_configs():
    d = configs.ddpmpp()
    assert d == dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
                     dropout=0.13, num_blocks=2, attn_resolutions=[16], skip_connections=None,
                     embedding_type="positional", encoder_type="standard", decoder_type="standard",
                     channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
    n = configs.ncsnpp(model_channels=64)
    assert (n["embedding_type"], n["encoder_type"], n["decoder_type"]) == ("fourier", "residual", "standard")
    assert (n["channel_mult_noise"], n["resample_filter"], n["model_channels"]) == (2, [1, 3, 3, 1], 64)
    d["channel_mult"].append(4)  # returned lists are the caller's own
    assert configs.ddpmpp()["channel_mult"] == [2, 2, 2]
    with pytest.raises(TypeError, match="num_block"):
        configs.ddpmpp(num_block=3)


# ---------------------------------------------------------------------------------------
# Shapes for every embedding / encoder / decoder type.

@pytest.mark.parametrize("embedding, encoder, decoder", list(itertools.product(
    ["positional", "fourier"], ["standard", "skip", "residual"], ["standard", "skip"])))
def test_output_shapes(embedding, encoder, decoder):
    filt = [1, 3, 3, 1] if encoder == "residual" else [1, 1]
    for label_dim, augment_dim in [(0, 0), (4, 9)]:
        kwargs = tiny(img_resolution=16, model_channels=16, channel_mult=[1, 2, 2], attn_resolutions=[8],
                      in_channels=3, out_channels=2, embedding_type=embedding, encoder_type=encoder,
                      decoder_type=decoder, resample_filter=filt, label_dim=label_dim, augment_dim=augment_dim,
                      channel_mult_noise=2 if embedding == "fourier" else 1)
        net = SongUNet(**kwargs).eval()
        x, noise, labels, augment = inputs(kwargs, batch=3)
        with torch.no_grad():
            y = net(x, noise, labels, augment)
        assert y.shape == (3, 2, 16, 16) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_labels_required_only_when_conditional():
    net = SongUNet(**tiny())
    x, noise, _, _ = inputs(tiny())
    assert net(x, noise, None).shape == x.shape
    with pytest.raises(ValueError, match="class_labels"):
        SongUNet(**tiny(label_dim=3))(x, noise, None)


def test_label_dropout():
    kwargs = tiny(label_dim=3, label_dropout=1.0)
    net = wake_up_(SongUNet(**kwargs))
    x, noise, labels, _ = inputs(kwargs)
    net.train()  # label dropout acts only in training; dropout=0 keeps the rest deterministic
    assert torch.equal(net(x, noise, labels), net(x, noise, torch.zeros_like(labels)))
    net.eval()
    assert not torch.allclose(net(x, noise, labels), net(x, noise, torch.zeros_like(labels)))


def capture_input(module, seen: dict):
    """Records the module's first input; the hook returns None, so nothing is altered."""
    def hook(m, args):
        seen["x"] = args[0]
    return module.register_forward_pre_hook(hook)


def embedding_seen_by_mlp(net, noise, labels=None):
    seen = {}
    handle = capture_input(net.map_layer0, seen)
    net(torch.zeros(len(noise), 3, 8, 8, dtype=noise.dtype), noise, labels)
    handle.remove()
    return seen["x"]


def test_noise_embeddings_formulas():
    t = torch.tensor([0.0, 0.3, -2.0, 700.0], dtype=torch.float64)
    net = SongUNet(**tiny(model_channels=8)).double()  # positional, 8 channels
    # endpoint=True: exponents 0, 1/3, 2/3, 1, so the last frequency is exactly 1e-4.
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    angles = t[:, None] * freqs
    # EDM forms the frequencies in float32 whatever the input dtype: |t| f 2^-24 ~ 2e-6 here.
    torch.testing.assert_close(embedding_seen_by_mlp(net, t), torch.cat([angles.sin(), angles.cos()], 1),
                               rtol=0, atol=1e-5)

    net = SongUNet(**tiny(embedding_type="fourier", channel_mult_noise=2)).double()
    assert net.map_noise.freqs.shape == (8,)
    angles = 2 * math.pi * t[:, None] * net.map_noise.freqs
    torch.testing.assert_close(embedding_seen_by_mlp(net, t), torch.cat([angles.sin(), angles.cos()], 1))

    # The modules themselves keep the [cos, sin] order; SongUNet swaps the halves.
    assert torch.equal(PositionalEmbedding(4)(torch.zeros(1)), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert FourierEmbedding(6).freqs.shape == (3,)

    label_net = SongUNet(**tiny(label_dim=4)).double()
    one_hot = F.one_hot(torch.tensor([2, 0, 1, 3]), 4).double()
    angles = t[:, None] * freqs
    want = torch.cat([angles.sin(), angles.cos()], 1) + label_net.map_label(one_hot * 2.0)  # sqrt(label_dim)
    torch.testing.assert_close(embedding_seen_by_mlp(label_net, t, one_hot), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Skip-connection mask.

def test_skip_mask_all_ones_is_identity_and_zeros_change_output():
    for encoder in ["standard", "skip", "residual"]:
        kwargs = tiny(encoder_type=encoder)
        n_skips = (1 + 1) * 2  # (num_blocks + 1) * levels
        ref = wake_up_(SongUNet(**kwargs)).eval()
        ones = SongUNet(**kwargs, skip_connections=[1] * n_skips).eval()
        ones.load_state_dict(ref.state_dict(), strict=True)
        x, noise, _, _ = inputs(kwargs)
        with torch.no_grad():
            y_ref = ref(x, noise, None)
            assert torch.equal(ones(x, noise, None), y_ref)
            for i in range(n_skips):
                mask = [1] * n_skips
                mask[i] = 0
                masked = SongUNet(**kwargs, skip_connections=mask).eval()
                assert count_parameters(masked) == count_parameters(ref)
                masked.load_state_dict(ref.state_dict(), strict=True)
                assert not torch.allclose(masked(x, noise, None), y_ref), (encoder, i)


def test_skip_mask_validation():
    expected = (3 + 1) * 3
    with pytest.raises(ValueError, match=f"expected {expected}"):
        SongUNet(**tiny(channel_mult=[1, 2, 2], num_blocks=3, skip_connections=[1] * (expected - 1)))
    with pytest.raises(ValueError, match="0 or 1"):
        SongUNet(**tiny(skip_connections=[1, 2, 1, 1]))
    with pytest.raises(ValueError, match="expected 12"):
        SongUNet(**configs.ddpmpp(num_blocks=3, skip_connections=[1] * 9))


def test_disabled_skip_has_no_influence():
    # Perturb enc['8x8_block0'] (mask entry 1) and hand the unperturbed tensor on to the
    # next encoder module, so the perturbation can reach the output only through the skip.
    kwargs = tiny()
    state = wake_up_(SongUNet(**kwargs)).state_dict()
    x, noise, _, _ = inputs(kwargs)

    def run(mask):
        net = SongUNet(**kwargs, skip_connections=mask).eval()
        net.load_state_dict(state, strict=True)
        with torch.no_grad():
            clean = net(x, noise, None)
            kept = {}

            def perturb(module, args, out):
                kept["out"] = out
                return out + 10 * torch.randn_like(out)

            h1 = net.enc["8x8_block0"].register_forward_hook(perturb)
            h2 = net.enc["4x4_down"].register_forward_pre_hook(lambda m, args: (kept["out"], args[1]))
            perturbed = net(x, noise, None)
            h1.remove()
            h2.remove()
        return clean, perturbed

    clean, perturbed = run([1, 1, 1, 1])
    assert not torch.allclose(clean, perturbed)  # the path exists when enabled
    clean, perturbed = run([1, 0, 1, 1])
    assert torch.equal(clean, perturbed)


@pytest.mark.parametrize("encoder", ["standard", "skip", "residual"])
def test_disabled_skip_reaches_decoder_as_zeros(encoder):
    # Entry 2 is enc['4x4_down']; the skip and residual encoders add their aux path to that
    # output afterwards, which must not refill the disabled slot. Decoder '_block' modules
    # pop skips last-in first-out: entry 2 of 4 is consumed by the 2nd one, dec['4x4_block1'].
    kwargs = tiny(encoder_type=encoder, resample_filter=[1, 3, 3, 1])
    for mask, want_zero in [([1, 1, 1, 1], False), ([1, 1, 0, 1], True)]:
        net = wake_up_(SongUNet(**kwargs, skip_connections=mask)).eval()
        seen = {}
        capture_input(net.dec["4x4_block1"], seen)
        x, noise, _, _ = inputs(kwargs)
        with torch.no_grad():
            net(x, noise, None)
        skip_part = seen["x"][:, -8:]  # enc['4x4_down'] has 8 channels, concatenated last
        assert seen["x"].shape[1] == 16 + 8
        assert bool((skip_part == 0).all()) == want_zero


# ---------------------------------------------------------------------------------------
# State dicts: EDM names, strict round trip.

BLOCK = ["norm0.weight", "norm0.bias", "conv0.weight", "conv0.bias", "affine.weight", "affine.bias",
         "norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias"]
SKIP = ["skip.weight", "skip.bias"]
ATTN = ["norm2.weight", "norm2.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
RESAMPLE = ["conv0.resample_filter", "skip.resample_filter"]


def keys(prefix, *groups):
    return [f"{prefix}.{name}" for group in groups for name in group]


def test_state_dict_keys_ncsnpp_style():
    net = SongUNet(**tiny(label_dim=2, augment_dim=3, embedding_type="fourier", channel_mult_noise=2,
                          encoder_type="residual", decoder_type="skip", resample_filter=[1, 3, 3, 1]))
    want = (
        ["map_noise.freqs", "map_label.weight", "map_label.bias", "map_augment.weight",
         "map_layer0.weight", "map_layer0.bias", "map_layer1.weight", "map_layer1.bias",
         "enc.8x8_conv.weight", "enc.8x8_conv.bias"]
        + keys("enc.8x8_block0", BLOCK)
        + keys("enc.4x4_down", BLOCK, SKIP, RESAMPLE)
        + ["enc.4x4_aux_residual.weight", "enc.4x4_aux_residual.bias", "enc.4x4_aux_residual.resample_filter"]
        + keys("enc.4x4_block0", BLOCK, SKIP, ATTN)
        + keys("dec.4x4_in0", BLOCK, ATTN)
        + keys("dec.4x4_in1", BLOCK)
        + keys("dec.4x4_block0", BLOCK, SKIP)
        + keys("dec.4x4_block1", BLOCK, SKIP, ATTN)
        + ["dec.4x4_aux_norm.weight", "dec.4x4_aux_norm.bias", "dec.4x4_aux_conv.weight", "dec.4x4_aux_conv.bias"]
        + keys("dec.8x8_up", BLOCK, SKIP, RESAMPLE)
        + keys("dec.8x8_block0", BLOCK, SKIP)
        + keys("dec.8x8_block1", BLOCK, SKIP)
        + ["dec.8x8_aux_up.resample_filter", "dec.8x8_aux_norm.weight", "dec.8x8_aux_norm.bias",
           "dec.8x8_aux_conv.weight", "dec.8x8_aux_conv.bias"]
    )
    sd = net.state_dict()
    assert len(sd) == len(want) and set(sd) == set(want)
    shapes = {
        "map_noise.freqs": (8,), "map_label.weight": (16, 2), "map_augment.weight": (16, 3),
        "map_layer0.weight": (32, 16), "map_layer1.weight": (32, 32),
        "enc.4x4_down.conv0.resample_filter": (1, 1, 4, 4),
        "enc.4x4_aux_residual.weight": (8, 3, 3, 3), "enc.4x4_block0.skip.weight": (16, 8, 1, 1),
        "enc.4x4_block0.qkv.weight": (48, 16, 1, 1), "enc.4x4_block0.affine.weight": (16, 32),
        "dec.4x4_block0.conv0.weight": (16, 32, 3, 3), "dec.4x4_block1.conv0.weight": (16, 24, 3, 3),
        "dec.8x8_block0.conv0.weight": (8, 24, 3, 3), "dec.8x8_aux_conv.weight": (3, 8, 3, 3),
        "dec.8x8_aux_up.resample_filter": (1, 1, 4, 4),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    torch.testing.assert_close(sd["dec.8x8_aux_up.resample_filter"][0, 0],
                               torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)


def test_state_dict_keys_ddpmpp_skip_encoder():
    net = SongUNet(**tiny(encoder_type="skip"))
    want = (
        ["map_layer0.weight", "map_layer0.bias", "map_layer1.weight", "map_layer1.bias",
         "enc.8x8_conv.weight", "enc.8x8_conv.bias"]
        + keys("enc.8x8_block0", BLOCK)
        + keys("enc.4x4_down", BLOCK, SKIP, RESAMPLE)
        + ["enc.4x4_aux_down.resample_filter", "enc.4x4_aux_skip.weight", "enc.4x4_aux_skip.bias"]
        + keys("enc.4x4_block0", BLOCK, SKIP, ATTN)
        + keys("dec.4x4_in0", BLOCK, ATTN)
        + keys("dec.4x4_in1", BLOCK)
        + keys("dec.4x4_block0", BLOCK, SKIP)
        + keys("dec.4x4_block1", BLOCK, SKIP, ATTN)
        + keys("dec.8x8_up", BLOCK, SKIP, RESAMPLE)
        + keys("dec.8x8_block0", BLOCK, SKIP)
        + keys("dec.8x8_block1", BLOCK, SKIP)
        + ["dec.8x8_aux_norm.weight", "dec.8x8_aux_norm.bias", "dec.8x8_aux_conv.weight", "dec.8x8_aux_conv.bias"]
    )
    assert len(net.state_dict()) == len(want) and set(net.state_dict()) == set(want)
    assert net.state_dict()["enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 2, 2)


def test_state_dict_round_trip_strict():
    kwargs = tiny(label_dim=3, augment_dim=2, embedding_type="fourier", channel_mult_noise=2,
                  encoder_type="residual", resample_filter=[1, 3, 3, 1])
    torch.manual_seed(1)
    a = wake_up_(SongUNet(**kwargs)).eval()
    torch.manual_seed(2)
    b = SongUNet(**kwargs).eval()
    x, noise, labels, augment = inputs(kwargs)
    with torch.no_grad():
        assert not torch.equal(a(x, noise, labels, augment), b(x, noise, labels, augment))
        b.load_state_dict(a.state_dict(), strict=True)  # includes the Fourier freqs buffer
        assert torch.equal(a(x, noise, labels, augment), b(x, noise, labels, augment))


# ---------------------------------------------------------------------------------------
# Initialization.

def test_initialization_scales():
    torch.manual_seed(0)
    net = SongUNet(**tiny(label_dim=3))
    params = dict(net.named_parameters())

    def xavier_bound(w):
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        return math.sqrt(6 / (fan_in + fan_out))

    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.all(p == 0), name  # init_bias = 0 everywhere in SongUNet
        elif ".norm" in name or "aux_norm" in name:
            assert torch.all(p == 1), name
        else:
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                gain = 1e-5
            elif name.endswith("qkv.weight"):
                gain = math.sqrt(0.2)
            else:
                gain = 1
            bound = gain * xavier_bound(p)
            assert p.abs().max() <= bound, name
            assert p.abs().max() > 0.8 * bound, name  # uniform, fills the interval

    torch.manual_seed(0)
    again = SongUNet(**tiny(label_dim=3))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))


# ---------------------------------------------------------------------------------------
# Independent functional recomputation of UNetBlock, in float64.

def group_norm_ref(x, groups, weight, bias, eps):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(x.shape) * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)


def unet_block_ref(blk, x, emb, heads, resample):
    """DDPM++ block (adaptive_scale=False) from its definition; [1,1] FIR resampling is
    2x2 average pooling down and nearest-neighbour up."""
    p = dict(blk.named_parameters())
    eps, s = 1e-6, math.sqrt(0.5)
    groups = lambda c: min(32, c // 4)  # noqa: E731

    def gn(name, t):
        return group_norm_ref(t, groups(t.shape[1]), p[f"{name}.weight"], p[f"{name}.bias"], eps)

    def resample_(t):
        if resample == "down":
            return F.avg_pool2d(t, 2)
        if resample == "up":
            return F.interpolate(t, scale_factor=2, mode="nearest")
        return t

    h = F.conv2d(resample_(F.silu(gn("norm0", x))), p["conv0.weight"], p["conv0.bias"], padding=1)
    h = h + F.linear(emb, p["affine.weight"], p["affine.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(gn("norm1", h)), p["conv1.weight"], p["conv1.bias"], padding=1)
    shortcut = resample_(x)
    if "skip.weight" in p:
        shortcut = F.conv2d(shortcut, p["skip.weight"], p["skip.bias"])
    h = (h + shortcut) * s

    n, c, hh, ww = h.shape
    qkv = F.conv2d(gn("norm2", h), p["qkv.weight"], p["qkv.bias"]).reshape(n, heads, c // heads, 3, hh * ww)
    q, k, v = (qkv[:, :, :, j].transpose(-1, -2) for j in range(3))  # [n, heads, HW, c/heads]
    a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c/heads)) v
    a = a.transpose(-1, -2).reshape(n, c, hh, ww)
    return (F.conv2d(a, p["proj.weight"], p["proj.bias"]) + h) * s


@pytest.mark.parametrize("cin, cout, heads, resample", [
    (8, 12, 1, None), (8, 8, 2, "down"), (12, 8, 1, "up"),
])
def test_unet_block_matches_functional_reference(cin, cout, heads, resample):
    torch.manual_seed(0)
    blk = UNetBlock(cin, cout, emb_channels=10, up=resample == "up", down=resample == "down",
                    attention=True, num_heads=heads, dropout=0.1, skip_scale=math.sqrt(0.5), eps=1e-6,
                    resample_filter=[1, 1], resample_proj=True, adaptive_scale=False,
                    init=dict(init_mode="xavier_uniform"),
                    init_zero=dict(init_mode="xavier_uniform", init_weight=1e-5),
                    init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)))
    blk = blk.double().eval()
    with torch.no_grad():  # every parameter random, so no term hides behind a zero init
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    emb = torch.randn(2, 10, dtype=torch.float64)
    with torch.no_grad():
        got = blk(x, emb)
        want = unet_block_ref(blk, x, emb, heads, resample)
    side = {"down": 3, "up": 12, None: 6}[resample]
    assert got.shape == (2, cout, side, side)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_weights_gradient():
    q = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_weights, (q, k))
    w = attention_weights(q.float(), k.float())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))


def test_fused_resampling_matches_unfused_for_pointwise_conv():
    # A 1x1 conv commutes with the depthwise FIR filter, so the two orders agree.
    x = torch.randn(2, 4, 8, 8)
    for up, down in [(True, False), (False, True)]:
        plain = Conv2d(4, 6, kernel=1, up=up, down=down, resample_filter=[1, 3, 3, 1], init_bias=1)
        fused = Conv2d(4, 6, kernel=1, up=up, down=down, resample_filter=[1, 3, 3, 1], fused_resample=True)
        fused.load_state_dict(plain.state_dict())
        torch.testing.assert_close(fused(x), plain(x))
    # The filter is normalized: a constant image stays constant away from the border.
    down = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    torch.testing.assert_close(down(torch.ones(1, 1, 8, 8))[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))


def test_reduced_precision_forward():
    # EDM runs the net in fp16 with fp32 master weights: each layer casts its weights to
    # the input dtype, and attention weights are computed in float32.
    kwargs = tiny(label_dim=3)
    net = wake_up_(SongUNet(**kwargs)).eval()
    x, noise, labels, _ = inputs(kwargs)
    with torch.no_grad():
        y32 = net(x, noise, labels)
        y16 = net(x.bfloat16(), noise.bfloat16(), labels.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.1 * y32.abs().max().item())
