"""EDM snapshot import: outputs against an independent PyTorch reference of EDM's denoisers for every
supported preconditioning and network family, parameter counts of EDM's published settings, the
teacher workdir (restore and Heun sampling), and errors for files that are not supported snapshots.

The snapshots are small random-weight networks pickled the way EDM's training loop pickles them
(tests/edm_reference.py); EDM's `torch_utils` and `dnnlib` exist only while a pickle is written.
"""
import importlib
import json
import os
import pickle
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fdistill import main, models, modes, workdir
from fdistill.models import DDPMpp, edm_import
from tests import edm_reference as ref

SONG = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
DDPMPP = dict(SONG, embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(SONG, embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM = dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], dropout=0.1)
CASES = {  # (precond, network, constructor arguments beyond the image size and channels)
    "edm-ddpmpp-cond-augment": ("edm", "SongUNet", dict(DDPMPP, label_dim=4, augment_dim=9)),
    "vp-ddpmpp-skip": ("vp", "SongUNet", dict(DDPMPP, encoder_type="skip", decoder_type="skip",
                                              beta_min=0.2, beta_d=15.)),
    "ve-ncsnpp": ("ve", "SongUNet", dict(NCSNPP, sigma_min=0.01, sigma_max=60.)),
    "edm-adm-cond-augment": ("edm", "DhariwalUNet", dict(ADM, label_dim=5, augment_dim=9)),
}
SIGMAS = np.array([0.002, 0.3, 2.5, 80.], np.float32)


def snapshot(tmp_path, name, seed=0, **overrides):
    precond, model_type, kw = CASES[name]
    net = ref.build(precond, model_type, seed=seed, img_resolution=8, img_channels=3, **dict(kw, **overrides))
    path = os.path.join(tmp_path, f"{name}.pkl")
    ref.write_snapshot(path, net)
    return net, path


def jitted_edm_call(teacher):
    graphdef, state = nnx.split(teacher)
    return jax.jit(lambda state, x, s, c: edm_import.edm_call(nnx.merge(graphdef, state), x, s, c)), state


def relative_error(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_edm_call_equals_edm_denoiser(tmp_path, name):
    net, path = snapshot(tmp_path, name)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    teacher, config = edm_import.load(path)
    precond = CASES[name][0]
    assert config.model.precond == precond
    assert config.process.name == {"edm": "edm", "vp": "vpsde", "ve": "vesde"}[precond]
    n = len(SIGMAS)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((n, 8, 8, 3)) * np.sqrt(SIGMAS ** 2 + 0.25)[:, None, None, None]).astype(np.float32)
    labels = np.eye(net.label_dim, dtype=np.float32)[np.arange(n) % net.label_dim] if net.label_dim else None
    call, state = jitted_edm_call(teacher)
    out = call(state, x, SIGMAS, labels)
    expect = ref.reference_call(net, x, SIGMAS, labels)
    assert out.shape == x.shape and np.abs(expect).max() > 0.1
    assert relative_error(out, expect) < 1e-4, relative_error(out, expect)
    # The config rebuilds the teacher, and EDM's parameter names and shapes are the reference's.
    rebuilt = nnx.eval_shape(lambda: modes.build_model(config))
    assert jax.tree.structure(nnx.state(rebuilt)) == jax.tree.structure(nnx.state(teacher))
    torch_shapes = {k[len("model."):]: tuple(p.shape) for k, p in net.named_parameters()}
    assert edm_import.edm_parameter_shapes(teacher.net, augment_dim=net.model.map_augment.in_features
                                           if net.model.map_augment is not None else 0) == torch_shapes


def test_edm_parameter_counts_of_published_settings():
    """EDM's CIFAR-10 conditional DDPM++ with and without its augmentation layer, shapes only (ADM's
    ImageNet-64 count is in test_adm.py)."""
    ddpmpp = nnx.eval_shape(lambda: DDPMpp(32, 3, 3, label_dim=10, rngs=nnx.Rngs(0)))
    count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
    assert count(edm_import.edm_parameter_shapes(ddpmpp, augment_dim=9)) == 55_735_299
    assert count(edm_import.edm_parameter_shapes(ddpmpp)) == 55_734_147
    assert sum(x.size for x in jax.tree.leaves(nnx.state(ddpmpp, nnx.Param))) == 55_734_147
    shapes = edm_import.edm_parameter_shapes(ddpmpp, augment_dim=9)
    assert shapes["map_augment.weight"] == (128, 9) and shapes["enc.32x32_conv.weight"] == (128, 3, 3, 3)
    assert shapes["map_label.weight"] == (128, 10)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A conditional DDPM++ snapshot imported into a teacher workdir."""
    tmp = tmp_path_factory.mktemp("edm")
    net, path = snapshot(str(tmp), "edm-ddpmpp-cond-augment", seed=3)
    wd = str(tmp / "teacher")
    results = main.run(_import_config(path), wd, "import_edm")     # the command line's mode
    return net, path, wd, results


def _import_config(path):
    from configs import distill_cifar10
    c = distill_cifar10.get_config()
    c.import_edm.pkl = path
    return c


def test_import_to_workdir_restores_through_the_teacher_loop(imported):
    net, path, wd, results = imported
    config = workdir.read_config(wd)
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["mode"] == "import_edm"
    assert config.model.name == "ddpmpp" and config.data.num_classes == 4
    assert results["import_edm/num_params"] == sum(p.numel() for k, p in net.named_parameters()
                                                   if "map_augment" not in k)
    model, step = modes.load_teacher(config, wd)
    teacher, _ = edm_import.load(path)
    assert step == 0
    restored, loaded = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(teacher))
    assert len(restored) == len(loaded) and all(np.array_equal(a, b) for a, b in zip(restored, loaded))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        modes.import_edm(_import_config(path), wd)


def test_imported_teacher_samples_with_heun_18_steps_35_nfe(imported):
    _, _, wd, _ = imported
    config = workdir.read_config(wd)
    assert (config.sampling.sampler, config.sampling.num_steps) == ("heun", 18)
    config.sampling.num_samples = config.sampling.batch_size = 4
    results = modes.sample(config, wd)
    assert results["sample/nfe"] == 35 and results["sample/num_samples"] == 4
    x = np.load(os.path.join(wd, "samples.npz"))["samples"]
    assert x.shape == (4, 8, 8, 3) and np.all(np.isfinite(x))


def test_files_that_are_not_supported_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError, match="nvlabs-fi-cdn.nvidia.com/edm/pretrained"):
        edm_import.load(str(tmp_path / "missing.pkl"))
    text = tmp_path / "notes.pkl"
    text.write_text("not a pickle at all\n")
    with pytest.raises(edm_import.EDMImportError, match="not an EDM snapshot: it is not a pickle"):
        edm_import.load(str(text))
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"generator": [1, 2, 3]}))
    with pytest.raises(edm_import.EDMImportError, match=r"not an EDM network snapshot.*\['generator'\]"):
        edm_import.load(str(other))
    _, path = snapshot(str(tmp_path), "vp-ddpmpp-skip")
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.pkl"
        truncated.write_bytes(data[:cut])
        with pytest.raises(edm_import.EDMImportError, match="is truncated.*Download it again"):
            edm_import.load(str(truncated))


@ref.persistent
class UNet2DModel(ref.SongUNet):
    """A network EDM does not define."""


@ref.persistent
class iDDPMPrecond(ref.EDMPrecond):
    """A preconditioning the importer does not map."""


def test_unknown_architecture_and_preconditioning(tmp_path):
    ref.MODELS["UNet2DModel"] = UNet2DModel
    try:
        net = ref.build("edm", "UNet2DModel", img_resolution=8, img_channels=3, **DDPMPP)
    finally:
        del ref.MODELS["UNet2DModel"]
    ref.write_snapshot(tmp_path / "unet2d.pkl", net)
    with pytest.raises(edm_import.EDMImportError,
                       match=r"unknown architecture 'UNet2DModel'; supported: SongUNet .*DhariwalUNet"):
        edm_import.load(str(tmp_path / "unet2d.pkl"))
    iddpm = iDDPMPrecond(img_resolution=8, img_channels=3, model_type="DhariwalUNet", **ADM)
    ref.write_snapshot(tmp_path / "iddpm.pkl", iddpm)
    with pytest.raises(edm_import.EDMImportError,
                       match="unsupported preconditioning 'iDDPMPrecond'; supported: EDMPrecond, VPPrecond, VEPrecond"):
        edm_import.load(str(tmp_path / "iddpm.pkl"))


def test_snapshot_that_disagrees_with_its_recorded_architecture(tmp_path):
    net = ref.build("edm", "SongUNet", img_resolution=8, img_channels=3, **DDPMPP)
    net.model._init_kwargs["num_blocks"] = 2   # the recorded arguments no longer describe the weights
    ref.write_snapshot(tmp_path / "bad.pkl", net)
    with pytest.raises(edm_import.EDMImportError, match="does not match the architecture.*missing"):
        edm_import.load(str(tmp_path / "bad.pkl"))


def published_record(model_type, model_kwargs, label_dim, resolution):
    """The `ema` record of an EDMPrecond snapshot as EDM's train.py constructs it (no weights)."""
    model = edm_import.PersistentRecord(model_type, {"_init_kwargs": dict(
        img_resolution=resolution, in_channels=3, out_channels=3, label_dim=label_dim, **model_kwargs)})
    return edm_import.PersistentRecord("EDMPrecond", {"sigma_min": 0, "sigma_max": float("inf"),
                                                      "sigma_data": 0.5, "_modules": {"model": model}})


TEACHER_CONFIG = {"distill_cifar10": "configs.cifar10_edm_ddpmpp", "distill_imagenet64": "configs.imagenet64"}


@pytest.mark.parametrize("name", ["distill_cifar10", "distill_imagenet64"])
def test_distill_configs_rebuild_the_published_teachers(name):
    """The distill configs' teacher sections are what importing EDM's published snapshot gives
    (`--cond=1 --arch=ddpmpp` with EDM's default augmentation and dropout 0.13; `--arch=adm`)."""
    if name == "distill_cifar10":
        kw = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                  augment_dim=9, dropout=0.13)
        ema, dataset = published_record("SongUNet", kw, 10, 32), "datasets/cifar10-32x32.zip"
    else:
        kw = dict(model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1)
        ema, dataset = published_record("DhariwalUNet", kw, 1000, 64), "datasets/imagenet-64x64.zip"
    imported = edm_import.snapshot_config({"ema": ema, "dataset_kwargs": {"path": dataset}})
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.distill.teacher_workdir and config.import_edm.pkl.startswith("edm-")
    assert "model" not in config and "process" not in config   # read from the teacher's workdir
    # The teacher config file the distill config is built from describes the same network, so a
    # teacher trained here (with the published teacher's label count) is a drop-in replacement.
    teacher = importlib.import_module(TEACHER_CONFIG[name]).get_config()
    fields = models.ADM_FIELDS if imported.model.name == "adm" else models.UNET_FIELDS
    for field in ("name", "precond") + fields:
        assert teacher.model[field] == imported.model[field], field
    for field in ("name", "sigma_min", "sigma_max", "sigma_data"):
        assert teacher.process[field] == imported.process[field], field
    for field in ("name", "image_size", "num_channels"):
        assert teacher.data[field] == imported.data[field], field
    assert imported.data.num_classes == {"distill_cifar10": 10, "distill_imagenet64": 1000}[name]
    assert config.seed == teacher.seed and config.eval == teacher.eval