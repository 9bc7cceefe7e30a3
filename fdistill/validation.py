"""Config values checked before anything compiles: each bad value is named by its field.

``validate(config, mode)`` checks the sections ``mode`` reads (a field absent from a config is
skipped: toy, image and video configs carry different sections). Every problem found is reported
at once, one line per field, e.g. ``config.distill.student_optim.lr = nan: must be finite and >
0``.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

from fdistill.errors import ConfigError

# The sections each mode of fdistill.main reads (video configs share the mode names).
TRAIN, SAMPLE, LIKELIHOOD, DISTILL, EVAL, FID_STATS, QUICKSTART = (
    "train", "sample", "likelihood", "distill", "eval", "fid_stats", "quickstart")
MODES = (TRAIN, SAMPLE, LIKELIHOOD, QUICKSTART, DISTILL, FID_STATS, EVAL, "import_edm")

_MISSING = object()


def _get(config, path: str):
    node = config
    for name in path.split("."):
        if not hasattr(node, "get") or name not in node:
            return _MISSING
        node = node[name]
    return node


def _count(value) -> bool:
    """A positive integer."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class _Checks:
    """Collects ``config.<path> = <value>: <rule>`` lines."""

    def __init__(self, config):
        self.config, self.problems = config, []

    def _report(self, path: str, value, rule: str) -> None:
        self.problems.append(f"config.{path} = {value!r}: {rule}")

    def positive(self, path: str) -> None:
        """Finite and > 0 (learning rates, eps)."""
        v = _get(self.config, path)
        if v is not _MISSING and not (_number(v) and math.isfinite(v) and v > 0):
            self._report(path, v, "must be finite and > 0")

    def nonnegative(self, path: str) -> None:
        v = _get(self.config, path)
        if v is not _MISSING and not (_number(v) and math.isfinite(v) and v >= 0):
            self._report(path, v, "must be finite and >= 0")

    def fraction(self, path: str, *, upper_open: bool = False) -> None:
        """In [0, 1] (EMA rates) or [0, 1) (Adam betas)."""
        v = _get(self.config, path)
        ok = _number(v) and math.isfinite(v) and 0 <= v and (v < 1 if upper_open else v <= 1)
        if v is not _MISSING and not ok:
            self._report(path, v, f"must be in [0, 1{')' if upper_open else ']'}")

    def integer(self, path: str, minimum: int) -> None:
        v = _get(self.config, path)
        if v is not _MISSING and not (isinstance(v, Integral) and not isinstance(v, bool)
                                      and v >= minimum):
            self._report(path, v, f"must be an integer >= {minimum}")

    def multiple(self, path: str, of: str) -> None:
        """``path`` is 0 (off) or a multiple of ``of`` (an evaluation at a log step); checked
        only when both are valid integers (the integer checks report them otherwise)."""
        v, base = _get(self.config, path), _get(self.config, of)
        if _count(v) and _count(base) and v % base:
            self._report(path, v, f"must be 0 (off) or a multiple of config.{of} = {base}")

    def optimizer(self, path: str) -> None:
        """A ``train.make_optimizer`` section."""
        self.positive(f"{path}.lr")
        self.integer(f"{path}.warmup", 0)
        self.fraction(f"{path}.beta1", upper_open=True)
        self.fraction(f"{path}.beta2", upper_open=True)
        self.positive(f"{path}.eps")
        self.nonnegative(f"{path}.weight_decay")
        self.nonnegative(f"{path}.grad_clip")


def _teacher_training(c: _Checks) -> None:
    c.optimizer("optim")
    for name in ("batch_size", "num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
        c.integer(f"training.{name}", 1)
    c.fraction("training.ema_rate")
    c.integer("eval.every", 0)
    if _count(_get(c.config, "eval.every")):
        c.multiple("eval.every", "training.log_every")
        c.integer("eval.periodic_num_samples", 1)
        c.integer("eval.batch_size", 1)


def _sampling(c: _Checks) -> None:
    for name in ("num_samples", "batch_size", "num_steps"):
        c.integer(f"sampling.{name}", 1)
    c.integer("eval.num_clips", 1)            # video sampling
    c.integer("eval.rollout_factor", 1)


def _churn(c: _Checks) -> None:
    """EDM's stochastic sampler (config.sampling.S_*): heun only."""
    c.nonnegative("sampling.S_churn")
    c.nonnegative("sampling.S_min")
    c.positive("sampling.S_noise")
    lo, hi = _get(c.config, "sampling.S_min"), _get(c.config, "sampling.S_max")
    if hi is not _MISSING and not (_number(hi) and not math.isnan(hi)
                                   and (not (_number(lo) and math.isfinite(lo)) or hi > lo)):
        c._report("sampling.S_max", hi, f"must be a number > config.sampling.S_min = {lo!r} "
                  f"(inf: no upper bound)")
    churn, name = _get(c.config, "sampling.S_churn"), _get(c.config, "sampling.sampler")
    if _number(churn) and churn > 0 and name is not _MISSING and name != "heun":
        c._report("sampling.S_churn", churn, f"must be 0 unless config.sampling.sampler is "
                  f"'heun' (EDM's stochastic sampler), got sampler {name!r}")


def _distillation(c: _Checks) -> None:
    distill = _get(c.config, "distill")
    if distill is _MISSING:
        c.problems.append("config.distill is missing: --mode=distill needs a distill config "
                          "(configs/distill_*.py, or configs/video*.py for video)")
        return
    for name in sorted(distill.keys()):
        if name.endswith("_optim"):
            c.optimizer(f"distill.{name}")
    for name in ("batch_size", "fkl_batch_size", "num_steps", "log_every",
                 "ckpt_every", "keep_checkpoints", "num_eval_samples", "eval_batch_size",
                 "num_pairs", "pair_substeps", "num_noise_steps",
                 "student_steps"):
        c.integer(f"distill.{name}", 1)
    c.integer("distill.student_update_every", 2)
    c.integer("distill.ode_init_steps", 0)
    c.integer("distill.eval_every", 0)
    c.fraction("distill.ema_rate")
    c.nonnegative("distill.regression_weight")
    c.positive("distill.timestep_shift")
    c.integer("distill.fkl_steps", 1)
    k, steps = _get(c.config, "distill.fkl_steps"), _get(c.config, "student.num_steps")
    if _count(k) and _count(steps) and k > steps:
        c._report("distill.fkl_steps", k, f"must be <= config.student.num_steps = {steps} (K "
                  f"constrained steps among the student's)")
    rho = _get(c.config, "process.frame_correlation")
    if rho is not _MISSING and rho and _get(c.config, "data.name") != "video":
        c._report("process.frame_correlation", rho, "must be 0 unless the data are video clips "
                  "(it correlates the noise of a clip's frames)")
    c.multiple("distill.eval_every", "distill.log_every")
    if _count(_get(c.config, "distill.eval_every")):
        c.integer("eval.periodic_num_samples", 1)
        c.integer("eval.batch_size", 1)


def _evaluation(c: _Checks) -> None:
    c.integer("eval.num_samples", 1)
    c.integer("eval.batch_size", 1)


_MODE_CHECKS = {
    TRAIN: (_teacher_training, _churn),
    SAMPLE: (_sampling, _churn),
    LIKELIHOOD: (lambda c: (c.integer("eval.num_examples", 1),
                            c.integer("sampling.batch_size", 1)),),
    QUICKSTART: (_teacher_training, _sampling, _churn),
    DISTILL: (_distillation,),
    FID_STATS: (_evaluation,),
    EVAL: (_evaluation, _churn),
    "import_edm": (),                 # reads config.import_edm.pkl only (checked by the mode)
}


def problems(config, mode: str) -> list[str]:
    """One line per bad value among the fields ``mode`` reads."""
    if mode not in _MODE_CHECKS:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    checks = _Checks(config)
    for check in _MODE_CHECKS[mode]:
        check(checks)
    return checks.problems


def validate(config, mode: str) -> None:
    """Raises ``ConfigError`` listing every bad value ``mode`` would read, each by its field."""
    found = problems(config, mode)
    if found:
        raise ConfigError(f"invalid config for --mode={mode}:\n  " + "\n  ".join(found)
                          + "\nSet each with --config.<field>=<value>.")
