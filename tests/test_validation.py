"""Config validation: every bad value is reported by its field before anything compiles."""
import glob
import importlib
import math
import os

import pytest

from fdistill import validation
from fdistill.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def set_field(config, path: str, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


CASES = [
    # (config, mode, field, value, rule)
    ("toy", "train", "optim.lr", math.nan, "must be finite and > 0"),
    ("toy", "train", "optim.lr", math.inf, "must be finite and > 0"),
    ("toy", "train", "optim.lr", -1e-3, "must be finite and > 0"),
    ("toy", "train", "optim.lr", 0.0, "must be finite and > 0"),
    ("toy", "train", "optim.beta2", 1.0, "must be in [0, 1)"),
    ("toy", "train", "optim.grad_clip", -1.0, "must be finite and >= 0"),
    ("toy", "train", "training.log_every", 0, "must be an integer >= 1"),
    ("toy", "train", "training.ckpt_every", 0, "must be an integer >= 1"),
    ("toy", "train", "training.keep_checkpoints", 0, "must be an integer >= 1"),
    ("toy", "train", "training.batch_size", 0, "must be an integer >= 1"),
    ("toy", "train", "training.ema_rate", 1.5, "must be in [0, 1]"),
    ("digits", "train", "eval.every", 300, "must be 0 (off) or a multiple of "
                                           "config.training.log_every = 200"),
    ("toy", "sample", "sampling.num_samples", 0, "must be an integer >= 1"),
    ("toy", "sample", "sampling.batch_size", 0, "must be an integer >= 1"),
    ("toy", "quickstart", "sampling.num_samples", 0, "must be an integer >= 1"),
    ("toy", "quickstart", "training.log_every", 0, "must be an integer >= 1"),
    ("cifar10", "eval", "eval.num_samples", 0, "must be an integer >= 1"),
    ("cifar10", "fid_stats", "eval.batch_size", 0, "must be an integer >= 1"),
    ("toy", "likelihood", "eval.num_examples", 0, "must be an integer >= 1"),
    ("distill_toy", "distill", "distill.student_optim.lr", math.nan, "must be finite and > 0"),
    ("distill_toy", "distill", "distill.fake_score_optim.lr", -1.0, "must be finite and > 0"),
    ("distill_digits", "distill", "distill.disc_optim.lr", math.inf, "must be finite and > 0"),
    ("distill_toy", "distill", "distill.log_every", 0, "must be an integer >= 1"),
    ("distill_toy", "distill", "distill.ckpt_every", 0, "must be an integer >= 1"),
    ("distill_toy", "distill", "distill.keep_checkpoints", 0, "must be an integer >= 1"),
    ("distill_toy", "distill", "distill.student_update_every", 1, "must be an integer >= 2"),
    ("distill_toy", "distill", "distill.num_eval_samples", 0, "must be an integer >= 1"),
    ("distill_toy", "distill", "distill.batch_size", 0, "must be an integer >= 1"),
    ("distill_cifar10", "distill", "distill.eval_batch_size", 0, "must be an integer >= 1"),
    ("video_quick", "train", "optim.lr", math.nan, "must be finite and > 0"),
    ("video_quick", "distill", "distill.fake_score_optim.lr", math.nan, "must be finite and > 0"),
    ("video_quick", "distill", "distill.student_optim.lr", 0.0, "must be finite and > 0"),
    ("video_quick", "distill", "distill.fkl_batch_size", 0, "must be an integer >= 1"),
    ("video_quick", "distill", "distill.student_update_every", 0, "must be an integer >= 2"),
    ("video_quick", "distill", "distill.num_steps", 0, "must be an integer >= 1"),
    ("video_quick", "distill", "distill.num_pairs", 0, "must be an integer >= 1"),
    ("video_quick", "sample", "eval.num_clips", 0, "must be an integer >= 1"),
    ("video_quick", "sample", "sampling.S_churn", -1.0, "must be finite and >= 0"),
    ("video_quick", "train", "sampling.S_noise", 0.0, "must be finite and > 0"),
    ("video_quick", "train", "sampling.S_min", math.nan, "must be finite and >= 0"),
    ("toy", "sample", "sampling.S_max", 0.0, "must be a number > config.sampling.S_min = 0.0 "
                                             "(inf: no upper bound)"),
]


@pytest.mark.parametrize("name,mode,field,value,rule", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}={c[3]}" for c in CASES])
def test_each_bad_value_is_named_by_its_field(name, mode, field, value, rule):
    config = load(name)
    assert validation.problems(config, mode) == []
    set_field(config, field, value)
    assert validation.problems(config, mode) == [f"config.{field} = {value!r}: {rule}"]
    with pytest.raises(ConfigError, match=f"config.{field} = ") as err:
        validation.validate(config, mode)
    assert isinstance(err.value, ValueError) and f"--mode={mode}" in str(err.value)


def test_churn_needs_the_heun_sampler():
    config = load("video_quick")
    config.sampling.S_churn = 1.0
    assert validation.problems(config, "sample") == []
    config.sampling.sampler = "pc"
    assert validation.problems(config, "sample") == [
        "config.sampling.S_churn = 1.0: must be 0 unless config.sampling.sampler is 'heun' "
        "(EDM's stochastic sampler), got sampler 'pc'"]


def test_all_problems_reported_at_once():
    config = load("distill_toy")
    config.distill.student_optim.lr = math.nan
    config.distill.log_every = 0
    config.distill.keep_checkpoints = -2
    assert validation.problems(config, "distill") == [
        "config.distill.student_optim.lr = nan: must be finite and > 0",
        "config.distill.log_every = 0: must be an integer >= 1",
        "config.distill.keep_checkpoints = -2: must be an integer >= 1"]


def test_a_mode_checks_only_what_it_reads():
    config = load("toy")                  # a teacher config with a distill section added
    config.distill = load("distill_toy").distill
    config.optim.lr = math.nan            # the teacher's optimiser: not read by distill
    config.eval.num_samples = 0           # read by --mode=eval only
    assert validation.problems(config, "distill") == []
    assert validation.problems(config, "train") == ["config.optim.lr = nan: must be finite and > 0"]


def test_distill_mode_needs_a_distill_section():
    with pytest.raises(ConfigError, match="config.distill is missing"):
        validation.validate(load("toy"), "distill")


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid modes: train, sample"):
        validation.validate(load("toy"), "trian")


def test_every_shipped_config_is_valid():
    names = [os.path.basename(p)[:-3] for p in sorted(glob.glob(os.path.join(ROOT, "configs",
                                                                             "*.py")))]
    checked = 0
    for name in names:
        module = importlib.import_module(f"configs.{name}")
        if not hasattr(module, "get_config"):
            continue
        config = module.get_config()
        for mode in validation.MODES:
            if mode == "distill" and "distill" not in config:
                continue
            assert validation.problems(config, mode) == [], (name, mode)
            checked += 1
    assert checked > 50
