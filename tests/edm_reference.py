"""An independent PyTorch reference of EDM's denoisers, and pickles shaped like EDM's snapshots.

The networks are written here from the papers (DDPM++/NCSN++ of Song et al. 2021 and ADM of
Dhariwal & Nichol 2021 in the form EDM, Karras et al. 2022, gives them; the preconditionings of
EDM's Table 1) in NCHW with torch operations, sharing no code with fdistill. Classes, attribute
names and constructor arguments are EDM's, because a snapshot records them.

`write_snapshot` pickles `{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}` the way EDM's
training loop does: every persistent object becomes `torch_utils.persistence.
_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name, state}. The
`torch_utils` and `dnnlib` modules exist only while the pickle is written, so the importer reads
classes it has never seen.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import pickle
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F


def _persistent_reduce(self):
    meta = dict(type="class", version=6, module_src=inspect.getsource(sys.modules[__name__]),
                class_name=type(self).__name__, state=dict(self.__dict__))
    return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def persistent(cls):
    """EDM's persistence, as far as a pickle shows it: constructor arguments recorded, and pickled
    as `_reconstruct_persistent_obj(meta)`."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

    cls.__init__, cls.__reduce__ = __init__, _persistent_reduce
    return cls


# --------------------------------------------------------------------------------------------------
# Layers (NCHW). Parameters start as zeros; `randomize` fills every one.

@persistent
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = x @ self.weight.t()
        return y if self.bias is None else y + self.bias


@persistent
class Conv2d(torch.nn.Module):
    """k x k convolution, optionally after 2x up/down resampling with the separable FIR filter
    f f^T / (sum f)^2 (x4 when upsampling); `fused_resample` (down only): convolve first, then
    filter with stride 2."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = torch.nn.Parameter(torch.zeros(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x):
        w, f = self.weight, self.resample_filter
        fpad = (f.shape[-1] - 1) // 2 if f is not None else 0
        wpad = w.shape[-1] // 2 if w is not None else 0
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=wpad + fpad)
            x = F.conv2d(x, f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, 4 * f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2,
                                       padding=fpad)
            if self.down:
                x = F.conv2d(x, f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=fpad)
            if w is not None:
                x = F.conv2d(x, w, padding=wpad)
        return x if self.bias is None else x + self.bias[None, :, None, None]


@persistent
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@persistent
class UNetBlock(torch.nn.Module):
    """GN-silu-conv, embedding (added, or adaptive scale/shift), GN-silu-dropout-conv, skip;
    optional multi-head self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0., skip_scale=1., eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads or out_channels // channels_per_head
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if in_channels != out_channels or up or down:
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        e = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (1 + scale))
        else:
            h = F.silu(self.norm1(h + e))
        h = self.conv1(h)
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, hh * ww).unbind(2)
            attn = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1]), dim=2)
            a = torch.einsum("nqk,nck->ncq", attn, v).reshape(b, c, hh, ww)
            x = (self.proj(a) + x) * self.skip_scale
        return x


@persistent
class PositionalEmbedding(torch.nn.Module):
    """[cos(t w_i), sin(t w_i)], w_i = (1 / max_positions)^(i / (C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, t):
        half = self.num_channels // 2
        w = (1 / self.max_positions) ** (torch.arange(half, dtype=t.dtype) / (half - int(self.endpoint)))
        return torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], dim=1)


@persistent
class FourierEmbedding(torch.nn.Module):
    """[cos(2 pi t w), sin(2 pi t w)], w ~ N(0, scale^2) fixed."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t):
        arg = 2 * np.pi * t[:, None] * self.freqs
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


# --------------------------------------------------------------------------------------------------
# Networks.

@persistent
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        blk = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = Linear(label_dim, noise_ch) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch)
        self.map_layer1 = Linear(emb_ch, emb_ch)
        self.enc = torch.nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, m in self.enc.items():
            if "aux_down" in name:
                aux = m(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + m(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)
        out = h = None
        for name, m in self.dec.items():
            if "aux_up" in name:
                out = m(out)
            elif "aux_norm" in name:
                h = m(x)
            elif "aux_conv" in name:
                h = m(F.silu(h))
                out = h if out is None else out + h
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return out


@persistent
class DhariwalUNet(torch.nn.Module):
    """ADM."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        emb_ch = model_channels * channel_mult_emb
        blk = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_ch)
        self.map_layer1 = Linear(emb_ch, emb_ch)
        self.map_label = Linear(label_dim, emb_ch, bias=False) if label_dim else None
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)
        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if x.shape[1] != m.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


MODELS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# --------------------------------------------------------------------------------------------------
# Preconditioning (EDM Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

class _Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (
            img_resolution, img_channels, label_dim, use_fp16)
        self.model = MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                        out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        labels = (None if self.label_dim == 0 else torch.zeros(x.shape[0], self.label_dim, dtype=x.dtype)
                  if class_labels is None else class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), labels)


@persistent
class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4)


@persistent
class VPPrecond(_Precond):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); c_noise = (M - 1) sigma^-1(sigma)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t

    def coefficients(self, sigma):
        t = ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * t


@persistent
class VEPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(sigma / 2)


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


# --------------------------------------------------------------------------------------------------
# What else EDM's snapshots hold.

@persistent
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


class Schedule:
    """A plain (non-persistent) class, as a pickle may reference: the importer must not import it."""

    def __init__(self, values):
        self.values = values


@persistent
class AugmentPipe:
    def __init__(self, p=0.12, **kwargs):
        self.p, self.kwargs, self.schedule = p, kwargs, Schedule([p])


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and O(1)-preserving (weights N(0, 1 / fan_in), biases and norm
    affines perturbed), so that no layer is the identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module


def build(precond: str, model_type: str, *, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight float32 EDM network, e.g. build('vp', 'SongUNet', img_resolution=16, ...)."""
    torch.manual_seed(seed)
    return randomize(PRECONDS[precond](model_type=model_type, **kwargs), seed).eval()


@contextlib.contextmanager
def edm_modules():
    """Stand-ins of EDM's `torch_utils.persistence` and `dnnlib.util`, registered only inside the block."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("EDM's persistence would execute meta['module_src'] here")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    util.EasyDict = easy
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    assert not set(modules) & set(sys.modules), "EDM's modules must not be importable in the tests"
    sys.modules.update(modules)
    try:
        yield easy
    finally:
        for name in modules:
            del sys.modules[name]


def write_snapshot(path, net: torch.nn.Module, *, dataset_path: str = "datasets/cifar10-32x32.zip") -> None:
    """Pickles `net` as EDM's training loop writes `network-snapshot-*.pkl`."""
    with edm_modules() as EasyDict, open(path, "wb") as f:
        loss_fn = EDMLoss()
        loss_fn.options = EasyDict(reduction="mean")
        dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path=dataset_path,
                              use_labels=bool(net.label_dim), xflip=False, cache=True,
                              resolution=net.img_resolution, max_size=50000)
        pickle.dump(dict(ema=net, loss_fn=loss_fn, augment_pipe=AugmentPipe(xflip=1e8, yflip=1),
                         dataset_kwargs=dataset_kwargs), f)


def reference_call(net: torch.nn.Module, x_nhwc: np.ndarray, sigma: np.ndarray, labels=None) -> np.ndarray:
    """D(x; sigma) of `net` computed in float64 (the float32 weights widened exactly), NHWC in and out."""
    x = torch.as_tensor(np.asarray(x_nhwc, np.float64)).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels, np.float64)) if labels is not None else None
    net.double()
    try:
        with torch.no_grad():
            out = net(x, torch.as_tensor(np.asarray(sigma, np.float64)), y)
    finally:
        net.float()
    return out.permute(0, 2, 3, 1).numpy()
