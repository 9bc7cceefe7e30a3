"""EDM's network snapshots (Karras et al. 2022) as this project's teachers.

EDM's training loop writes `network-snapshot-*.pkl`, and EDM publishes its models in the same form
(`edm-cifar10-32x32-cond-vp.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, the `baseline-*` conversions
of Score-SDE's models, ...): a pickled dict `{'ema': network, 'loss_fn', 'augment_pipe',
'dataset_kwargs'}`. EDM's classes travel inside the pickle (its `torch_utils.persistence`): each
object is pickled as `_reconstruct_persistent_obj(meta)`, meta = {type, version, module_src,
class_name, state}, where state is the object's `__dict__` (for a torch module: `_parameters`,
`_buffers`, `_modules` and the recorded constructor arguments `_init_args`, `_init_kwargs`). The
unpickler here turns each such object into a plain `PersistentRecord` (class name + state): it never
runs the pickled source and needs neither EDM's code nor `dnnlib`. PyTorch is needed to read the
tensors only (`pip install -e '.[edm]'`); what `load` returns, and a workdir that
`import_to_workdir` writes, use no torch.

Supported: EDMPrecond, VPPrecond and VEPrecond over SongUNet (DDPM++ and NCSN++ settings) and
DhariwalUNet (ADM). The preconditionings map onto `Denoiser`'s table (EDM Table 1):

    EDMPrecond(sigma_data)           -> precond 'edm', process EDM(sigma_data)
    VPPrecond(beta_min, beta_d, M)   -> precond 'vp',  process VPSDE(beta_min, beta_min + beta_d)
    VEPrecond(sigma_min, sigma_max)  -> precond 've',  process VESDE(sigma_min, sigma_max)

Tensors change layout only (convolutions OIHW -> HWIO, linear [out, in] -> [in, out]). EDM's
augmentation-label layer (`map_augment`, augment_dim > 0: the CIFAR-10 models) is dropped: EDM
applies it only when given augmentation labels, which sampling never passes. EDM runs snapshots
trained in half precision (`use_fp16`, the ImageNet-64 ADM) in float16 on GPUs; the imported teacher
computes in float32, as EDM does with `force_fp32`.

    from fdistill.models import edm_import
    teacher, config = edm_import.load("edm-cifar10-32x32-cond-vp.pkl")
    y = edm_import.edm_call(teacher, x, sigma, class_labels)  # EDM's net(x, sigma, labels), NHWC
    edm_import.import_to_workdir("edm-cifar10-32x32-cond-vp.pkl", "runs/edm_cifar10")

Unpickling runs torch's own tensor loaders: import only files from a source you trust.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pickle
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs.default import get_default_config
from fdistill.models import get_model

RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
# EDM's constructor defaults (training/networks.py); a snapshot records only the arguments passed.
ARCHITECTURES = {
    "SongUNet": dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                     label_dropout=0., embedding_type="positional", channel_mult_noise=1,
                     encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)),
    "DhariwalUNet": dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4),
                         channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
                         label_dropout=0.),
}
INTERFACE = ("img_resolution", "in_channels", "out_channels")
DATASETS = (("cifar10", "cifar10"), ("imagenet", "imagenet64"))  # file-name part -> data.name


class EDMImportError(ValueError):
    """A file that is not a supported EDM snapshot; the message names the problem and the fix."""


@dataclasses.dataclass
class PersistentRecord:
    """An object of one of EDM's persistent classes, read as data: its class name and state."""
    class_name: str
    state: dict

    @property
    def init_kwargs(self) -> dict:
        """The keyword arguments EDM's constructor was called with (recorded by its persistence)."""
        return dict(self.state.get("_init_kwargs") or {})

    def tensors(self, prefix: str = "") -> dict[str, Any]:
        """`state_dict()`-style {dotted name: tensor} of the parameters and buffers below this object."""
        return _tensors(self.state, prefix)


class TorchModuleRecord:
    """A plain (non-persistent) torch module, e.g. `torch.nn.ModuleDict`, read as its state."""

    def __setstate__(self, state):
        self.state = dict(state)

    def tensors(self, prefix: str = "") -> dict[str, Any]:
        return _tensors(getattr(self, "state", {}), prefix)


class _Opaque:
    """Any other object in the pickle (parts of `loss_fn`, `augment_pipe`): read past, never built."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _EasyDict(dict):
    """`dnnlib.EasyDict` (a dict with attribute access in EDM) as a plain dict."""


def _tensors(state: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, (PersistentRecord, TorchModuleRecord)):
            out.update(child.tensors(f"{prefix}{name}."))
    return out


def _reconstruct_persistent_obj(meta):
    """Stands in for `torch_utils.persistence._reconstruct_persistent_obj`: keeps class name and state."""
    if not isinstance(meta, dict) or "class_name" not in meta:
        raise EDMImportError("a persistent object in the pickle has no class name: not an EDM snapshot.")
    return PersistentRecord(str(meta["class_name"]), dict(meta.get("state") or {}))


class SnapshotUnpickler(pickle.Unpickler):
    """Reads an EDM snapshot without EDM's code: persistent objects and torch modules become records,
    tensors are rebuilt by torch, and any other class is read past as an opaque placeholder."""

    SAFE_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                    ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"),
                    ("copyreg", "_reconstructor")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct_persistent_obj
        if (module, name) == ("dnnlib.util", "EasyDict"):
            return _EasyDict
        if module.startswith("torch.nn.modules"):
            return TorchModuleRecord
        if (module == "torch" or module.startswith("torch.") or module.split(".")[0] == "numpy"
                or (module, name) in self.SAFE_GLOBALS):
            return super().find_class(module, name)
        return _Opaque


def _require_torch():
    if importlib.util.find_spec("torch") is None:
        raise ImportError("Reading EDM snapshots needs PyTorch for its tensors (only for the import): "
                          "pip install -e '.[edm]'. Sampling, distilling and evaluating an imported "
                          "teacher do not need it.")


def _pickle_bounds(path: str) -> tuple[bool, bool]:
    """(starts like a binary pickle (PROTO opcode), ends with pickle's STOP opcode)."""
    with open(path, "rb") as f:
        head = f.read(1)
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False, False
        f.seek(-1, os.SEEK_END)
        return head == pickle.PROTO, f.read(1) == pickle.STOP


def read_snapshot(path: str) -> dict:
    """The snapshot dict of an EDM pickle, with `ema` (the network) as a `PersistentRecord`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file. EDM's published snapshots (e.g. "
                                f"edm-cifar10-32x32-cond-vp.pkl) download from {RELEASE_URL}")
    _require_torch()
    with open(path, "rb") as f:
        try:
            data = SnapshotUnpickler(f).load()
        except EDMImportError as e:
            raise EDMImportError(f"{path}: {e}") from e
        except Exception as e:  # pickle and torch raise many types for damaged input
            is_pickle, complete = _pickle_bounds(path)
            reason = f"({type(e).__name__}: {e})"
            if not is_pickle:
                raise EDMImportError(f"{path} is not an EDM snapshot: it is not a pickle (EDM writes binary "
                                     f"pickles, which start with byte 0x80) {reason}.") from e
            if not complete:
                raise EDMImportError(
                    f"{path} is truncated: it ends before the end of its pickle {reason}. Download it "
                    f"again from {RELEASE_URL} (or copy the snapshot again).") from e
            raise EDMImportError(f"{path} is damaged or not an EDM snapshot: its pickle cannot be read "
                                 f"{reason}.") from e
    if not isinstance(data, dict) or not isinstance(data.get("ema"), PersistentRecord):
        found = (f"a dict with keys {sorted(map(str, data))}" if isinstance(data, dict)
                 else f"a {type(data).__name__}")
        raise EDMImportError(
            f"{path} is a pickle but not an EDM network snapshot: EDM's snapshots hold a dict with "
            f"'ema' (the network, one of EDM's persistent classes), 'loss_fn', 'augment_pipe' and "
            f"'dataset_kwargs'; this one holds {found}.")
    return data


def _architecture(precond: PersistentRecord) -> tuple[str, PersistentRecord, dict]:
    """(EDM class name, record, constructor arguments with EDM's defaults filled in) of the network."""
    if precond.class_name not in PRECONDS:
        raise EDMImportError(
            f"unsupported preconditioning {precond.class_name!r}; supported: {', '.join(PRECONDS)} "
            f"(EDM's EDM / VP / VE formulations).")
    net = (precond.state.get("_modules") or {}).get("model")
    if not isinstance(net, PersistentRecord):
        raise EDMImportError(f"{precond.class_name} has no network `model`: not an EDM snapshot.")
    if net.class_name not in ARCHITECTURES:
        raise EDMImportError(
            f"unknown architecture {net.class_name!r}; supported: SongUNet (DDPM++, NCSN++) and "
            f"DhariwalUNet (ADM).")
    recorded = net.init_kwargs
    if not recorded:
        raise EDMImportError(f"the {net.class_name} in this snapshot did not record its constructor "
                             f"arguments, so its architecture cannot be rebuilt.")
    defaults = ARCHITECTURES[net.class_name]
    unknown = sorted(set(recorded) - set(defaults) - set(INTERFACE))
    if unknown:
        raise EDMImportError(f"{net.class_name} argument(s) {unknown} are not EDM's; known: "
                             f"{sorted(set(defaults) | set(INTERFACE))}.")
    kwargs = {**defaults, **recorded}
    for k in INTERFACE:
        if k not in kwargs:
            raise EDMImportError(f"the {net.class_name} in this snapshot lacks its {k!r} argument.")
    if kwargs["in_channels"] != kwargs["out_channels"]:
        raise EDMImportError(f"{precond.class_name} over a network with {kwargs['in_channels']} input and "
                             f"{kwargs['out_channels']} output channels is not an EDM denoiser.")
    return net.class_name, net, kwargs


def _dataset_name(dataset_kwargs, resolution: int) -> str:
    path = os.path.basename(str((dataset_kwargs or {}).get("path", ""))).lower()
    for part, name in DATASETS:
        if part in path:
            return name
    return os.path.splitext(path)[0] or f"edm_{resolution}x{resolution}"


def snapshot_config(data: dict) -> ml_collections.ConfigDict:
    """A full project config whose model, process and data rebuild the snapshot's network."""
    precond = data["ema"]
    arch, net, kw = _architecture(precond)
    s = precond.state
    c = get_default_config()
    c.data.name = _dataset_name(data.get("dataset_kwargs"), kw["img_resolution"])
    c.data.image_size = int(kw["img_resolution"])
    c.data.num_channels = int(kw["in_channels"])
    c.data.num_classes = int(kw["label_dim"])
    c.data.random_flip = bool((data.get("dataset_kwargs") or {}).get("xflip", False))

    c.model.precond = PRECONDS[precond.class_name]
    p = c.process
    if precond.class_name == "EDMPrecond":
        p.name = "edm"
        p.sigma_data = float(s.get("sigma_data", 0.5))
        p.sigma_min = max(p.sigma_min, float(s.get("sigma_min", 0.)))
        p.sigma_max = min(p.sigma_max, float(s.get("sigma_max", math.inf)))
    elif precond.class_name == "VPPrecond":
        if int(s.get("M", 1000)) != 1000:
            raise EDMImportError(f"VPPrecond with M={s['M']} is not supported; the 'vp' "
                                 f"preconditioning uses c_noise = 999 t (M = 1000).")
        p.name = "vpsde"
        p.beta_min = float(s.get("beta_min", 0.1))
        p.beta_max = p.beta_min + float(s.get("beta_d", 19.9))
    else:
        p.name = "vesde"
        p.sigma_min = float(s.get("sigma_min", 0.02))
        p.sigma_max = float(s.get("sigma_max", 100.))

    m = c.model
    m.model_channels = int(kw["model_channels"])
    m.channel_mult = tuple(int(v) for v in kw["channel_mult"])
    m.channel_mult_emb = int(kw["channel_mult_emb"])
    m.num_blocks = int(kw["num_blocks"])
    m.attn_resolutions = tuple(int(v) for v in kw["attn_resolutions"])
    m.dropout = float(kw["dropout"])
    m.label_dropout = float(kw["label_dropout"])
    if arch == "DhariwalUNet":
        m.name = "adm"
    else:
        m.name = "ncsnpp" if kw["embedding_type"] == "fourier" else "ddpmpp"
        m.embedding_type = kw["embedding_type"]
        m.channel_mult_noise = int(kw["channel_mult_noise"])
        m.encoder_type = kw["encoder_type"]
        m.decoder_type = kw["decoder_type"]
        m.resample_filter = tuple(kw["resample_filter"])
        if kw["embedding_type"] == "fourier":
            freqs = net.tensors().get("map_noise.freqs")
            if freqs is None:
                raise EDMImportError("the SongUNet's Fourier embedding has no `freqs` buffer.")
            m.fourier_freqs = tuple(float(v) for v in _numpy(freqs))
    c.sampling.sampler = "heun"
    c.sampling.num_steps = 18 if c.data.image_size <= 32 else 40
    return c


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


def _edm_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """EDM's shape of one of our arrays: HWIO -> OIHW, [in, out] -> [out, in]."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _from_edm_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T


def _leaves(state) -> dict[str, Any]:
    """{dotted name: leaf} of a pure state dict, named as EDM names the same tensor."""
    flat = {}

    def visit(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                visit(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    visit(state, "")
    return flat


def edm_parameter_shapes(net: nnx.Module, *, augment_dim: int = 0) -> dict[str, tuple[int, ...]]:
    """{name: shape} of EDM's parameters for our `net` (SongUNet or DhariwalUNet), in EDM's naming and
    layout, with EDM's augmentation-label layer when `augment_dim > 0` (that layer is not imported)."""
    params = _leaves(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    shapes = {k: _edm_layout(tuple(v.shape)) for k, v in params.items()}
    if augment_dim:
        shapes["map_augment.weight"] = (net.map_layer0.in_features, augment_dim)
    return shapes


def _resample_kernel(resample_filter) -> np.ndarray:
    f = np.asarray(resample_filter, np.float32)
    return (np.outer(f, f) / f.sum() ** 2)[None, None]


def _load_weights(config, net_record: PersistentRecord, augment_dim: int):
    """The config's Denoiser with every array taken from the snapshot (shapes checked, nothing left over)."""
    abstract = nnx.eval_shape(lambda: get_model(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tensors = net_record.tensors()
    pure = nnx.to_pure_dict(state)
    ours = _leaves(pure["net"])
    missing = sorted(k for k in ours if k not in tensors)
    wrong = [f"{k}: snapshot {tuple(tensors[k].shape)}, expected {_edm_layout(tuple(v.shape))}"
             for k, v in ours.items() if k in tensors and tuple(tensors[k].shape) != _edm_layout(tuple(v.shape))]
    kernel = _resample_kernel((1, 1) if config.model.name == "adm" else config.model.resample_filter)
    extra, filters = [], []
    for k, v in tensors.items():
        if k in ours:
            continue
        if k.endswith(".resample_filter"):
            if _numpy(v).shape != kernel.shape or not np.allclose(_numpy(v), kernel, atol=1e-7):
                filters.append(k)
        elif not (augment_dim and k == "map_augment.weight"):
            extra.append(k)
    if missing or wrong or extra or filters:
        parts = [f"missing {missing[:5]}" if missing else "", f"shape mismatches {wrong[:5]}" if wrong else "",
                 f"unexpected tensors {sorted(extra)[:5]}" if extra else "",
                 f"resampling filters other than {kernel[0, 0, 0].tolist()} in {filters[:3]}" if filters else ""]
        raise EDMImportError(
            f"the snapshot's {net_record.class_name} does not match the architecture its recorded "
            f"arguments describe ({'; '.join(p for p in parts if p)}); the snapshot is damaged or was "
            f"written by a modified EDM.")

    def fill(node, prefix):
        return {k: fill(v, f"{prefix}{k}.") if isinstance(v, dict)
                else jnp.asarray(_from_edm_layout(_numpy(tensors[f"{prefix}{k}"])).astype(np.float32))
                for k, v in node.items()}

    nnx.replace_by_pure_dict(state, {"net": fill(pure["net"], "")})
    return nnx.merge(graphdef, state)


def load(path: str):
    """`(teacher, config)` from an EDM snapshot: the project's `Denoiser` with the snapshot's (EMA)
    weights, and a full config whose model / process / data sections rebuild it."""
    data = read_snapshot(path)
    try:
        config = snapshot_config(data)
        _, net, kw = _architecture(data["ema"])
        teacher = _load_weights(config, net, int(kw["augment_dim"]))
    except EDMImportError as e:
        raise EDMImportError(f"{path}: {e}") from e
    return teacher, config


def edm_call(teacher, x, sigma, class_labels=None):
    """EDM's `net(x, sigma, class_labels)` = D(x; sigma) through the project's `Denoiser`, NHWC.

    x [N, H, W, C] in EDM's scaled space (x = x_t / alpha_t), sigma [N] (or a scalar) > 0,
    class_labels [N, num_classes] one-hot or None. The Denoiser takes process time and unscaled
    x_t: t = sigma^-1(sigma) (EDM Table 1) and x_t = alpha(t) x.
    """
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), x.shape[:1])
    process = teacher.process
    t = process.inverse_scaled_sigma(sigma)
    alpha, _ = process.marginal_coefs(t)
    return teacher(alpha[:, None, None, None] * x, t, class_labels)
