"""Every config in configs/ loads, builds its network abstractly (no parameters allocated) with the
parameter count its architecture implies, and documents a command line that the CLI accepts."""
import glob
import importlib
import os
import re

import jax
import pytest
from flax import nnx

from fdistill import main, models, modes
from tests.test_adm import ref_dhariwal_params
from tests.test_models import ref_songunet_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if hasattr(importlib.import_module(f"configs.{os.path.basename(p)[:-3]}"),
                            "get_config"))
# Dataset bases are completed by overrides; their docstring names the overrides to run.
BASES = {"cifar10": ("cifar10_edm_ddpmpp", "cifar10_vp_ddpmpp", "cifar10_ve_ncsnpp")}
# Parameter counts with a published or hand-derived reference:
#   EDM's CIFAR-10 DDPM++ / NCSN++ snapshots less map_augment (9 x 128 / 9 x 256 weights, no
#   bias; tests/test_models.py); conditional adds map_label Linear(10, 128) = 1,408.
#   toy MLP (h = 128, depth 4, 2-D): 2 mapping layers + 4 blocks x 3 layers of h^2 + h, plus
#   in (2h + h) and out (2h + 2) = 231,810. Video transformer (D = 64, depth 4, 4x4 patches of
#   1 channel, 16 tokens/frame): 318,544 (see `video_transformer_params`). EDM's ImageNet-64 ADM
#   (edm-imagenet-64x64-cond-adm): 295,899,267.
EXPECTED = {"cifar10_edm_ddpmpp": 55_732_739, "cifar10_vp_ddpmpp": 55_732_739,
            "cifar10": 55_732_739, "cifar10_ve_ncsnpp": 56_395_523,
            "distill_cifar10": 55_732_739 + 1_408, "toy": 58_562, "distill_toy": 58_562,
            "video": 318_544, "imagenet64": 295_899_267, "distill_imagenet64": 295_899_267}


# Overrides of a distill config's teacher that its docstring states in prose.
TEACHER_OVERRIDES = {"distill_cifar10": {"num_classes": 10}}


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def teacher_name(name: str) -> str | None:
    """A distill config's teacher: the other config file its docstring names (None for a config
    with its own network)."""
    if "model" in load(name):
        return None
    doc = importlib.import_module(f"configs.{name}").__doc__ or ""
    named = [n for n in re.findall(r"configs/(\w+)\.py", doc) if n != name]
    assert named, f"configs/{name}.py has no network and its docstring names no teacher config"
    return named[0]


def resolved(name: str):
    """The config a run of ``name`` builds its networks from: a distill config completed with its
    teacher's recorded sections, as ``--mode=distill`` does."""
    config, teacher = load(name), teacher_name(name)
    if teacher is None:
        return config
    recorded = load(teacher)
    doc = importlib.import_module(f"configs.{name}").__doc__
    for field, value in TEACHER_OVERRIDES.get(name, {}).items():
        assert f"--config.data.{field}={value}" in doc, (name, field)
        recorded.data[field] = value
    return modes.resolve_config(config, recorded)


def build_abstract(config):
    """The config's denoiser as shapes only; a distill config shares its teacher's build."""
    key = tuple(config[k].to_json() for k in ("data", "model", "process"))
    if key not in _BUILT:
        _BUILT[key] = nnx.eval_shape(lambda: models.get_model(config, rngs=nnx.Rngs(0)))
    return _BUILT[key]


_BUILT = {}


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def mlp_params(dim, hidden, depth, label_dim):
    linear = lambda i, o: i * o + o
    return (2 * linear(hidden, hidden) + linear(dim, hidden) + 3 * depth * linear(hidden, hidden)
            + linear(hidden, dim) + (linear(label_dim, hidden) if label_dim else 0))


def video_transformer_params(size, channels, patch, dim, depth, mlp_ratio):
    """embed + positions + 2 noise layers + blocks (qkv, proj, fc1, fc2, adaLN 6D) + adaLN-out
    + out."""
    linear = lambda i, o: i * o + o
    patch_dim, tokens = patch * patch * channels, (size // patch) ** 2
    block = (linear(dim, 3 * dim) + linear(dim, dim) + linear(dim, mlp_ratio * dim)
             + linear(mlp_ratio * dim, dim) + linear(dim, 6 * dim))
    return (linear(patch_dim, dim) + tokens * dim + 2 * linear(dim, dim) + depth * block
            + linear(dim, 2 * dim) + linear(dim, patch_dim))


def reference_count(config) -> int:
    """The count implied by the config, from layer lists independent of fdistill.models."""
    d, m = config.data, config.model
    if m.name == "mlp":
        return mlp_params(d.dim, m.hidden, m.depth, d.num_classes)
    if m.name == "video_transformer":
        return video_transformer_params(d.size, d.channels, m.patch_size, m.dim, m.depth,
                                        m.mlp_ratio)
    if m.name == "adm":
        return ref_dhariwal_params(d.image_size, d.num_channels, d.num_classes, m.model_channels,
                                   tuple(m.channel_mult), m.channel_mult_emb, m.num_blocks,
                                   tuple(m.attn_resolutions))
    return ref_songunet_params(d.image_size, d.num_channels, d.num_classes, m.model_channels,
                               tuple(m.channel_mult), m.channel_mult_emb, m.num_blocks,
                               tuple(m.attn_resolutions), m.channel_mult_noise, m.encoder_type,
                               m.decoder_type)


def test_all_configs_are_found():
    assert {"toy", "digits", "cifar10_edm_ddpmpp", "distill_cifar10", "video"} <= set(CONFIGS)
    assert "default" not in CONFIGS and "distill_base" not in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_network_builds_abstractly_with_its_parameter_count(name):
    config = resolved(name)
    model = build_abstract(config)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    count = n_params(model)
    assert count == reference_count(config)
    if name in EXPECTED:
        assert count == EXPECTED[name]


def _commands(doc: str) -> list[str]:
    """`python -m fdistill.main ...` commands in a docstring, backslash continuations joined."""
    joined = re.sub(r"\\\s*\n\s*", " ", doc)
    return [line.strip() for line in joined.splitlines() if "python -m fdistill.main" in line]


def _field_exists(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_gives_a_command_line_for_existing_fields(name):
    doc = importlib.import_module(f"configs.{name}").__doc__ or ""
    if name in BASES:
        for override in BASES[name]:
            assert override in doc and override in CONFIGS
        return
    commands = _commands(doc)
    assert any(f"--config=configs/{name}.py" in c for c in commands), doc
    for command in commands:
        # Each command's overrides against the config that command loads.
        config = load(re.search(r"--config=configs/(\w+)\.py", command).group(1))
        for field in re.findall(r"--config\.([\w.]+)=", command):
            assert _field_exists(config, field), (name, command, field)


@pytest.mark.parametrize("name", [n for n in CONFIGS if teacher_name(n) is not None])
def test_distill_config_carries_no_teacher_sections(name):
    """A distill config holds its own settings only; model, process and training come from the
    teacher's recorded config, and its documented teacher command trains into the default
    ``distill.teacher_workdir``."""
    config = load(name)
    assert not {"model", "process", "training", "optim"} & set(config), sorted(config)
    assert set(config.data) == {"data_dir"}
    teacher_workdir = config.distill.teacher_workdir
    doc = importlib.import_module(f"configs.{name}").__doc__
    if teacher_workdir:
        assert f"--config.distill.teacher_workdir={teacher_workdir}" in " ".join(_commands(doc))
    for command in _commands(doc):
        if "--mode=train" in command and teacher_workdir:
            assert f"--config=configs/{teacher_name(name)}.py" in command
            assert f"--workdir={teacher_workdir}" in command


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in BASES])
def test_docstring_commands_use_modes_the_cli_has(name):
    for command in _commands(importlib.import_module(f"configs.{name}").__doc__):
        mode = re.search(r"--mode=(\w+)", command)
        assert mode and mode.group(1) in main.MODES, (name, command, sorted(main.MODES))
