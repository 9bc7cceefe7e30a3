"""Training loops: one jitted, donated, sharded step over a state pytree, and the loop around it.

The state is a dict of pure pytrees ``{'step', 'params', 'ema', 'opt_state', 'nonfinite'}``;
networks are NNX modules used functionally (``nnx.split`` once, ``nnx.merge`` inside the jitted
step), which is what sharding, donation and orbax want (Flax's performance guide). Per-step
randomness is ``fold_in(key, step)`` and batches are a pure function of the step, so a resumed
run continues bit-for-bit.

A non-finite loss or gradient leaves the parameters untouched on device (the update is skipped)
and records the first bad step; the host checks the record at every log and before every save
and stops with the step and the metric, so a good checkpoint is never overwritten.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import checkpoint, monitor, sharding
from fdistill.errors import FdistillError

State = dict[str, Any]


class NonFiniteError(FdistillError, FloatingPointError):
    """A loss, gradient or updated state became NaN or infinite; the last good checkpoint is
    kept."""


# ---------------------------------------------------------------------------------------------
# Optimisation pieces shared by the teacher, distillation and video loops.

def make_optimizer(optim) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and global-norm gradient clipping.

    ``optim`` fields: ``lr``, ``warmup`` (steps), ``beta1``, ``beta2``, ``eps``,
    ``weight_decay`` (0 gives Adam), ``grad_clip`` (0 disables), and optionally ``decay_steps``
    (> 0: cosine decay from ``lr`` to 0 over that many steps after the warm-up).
    """
    lr, warmup, decay = optim.lr, int(optim.get("warmup", 0)), int(optim.get("decay_steps", 0))
    if decay:
        lr = optax.warmup_cosine_decay_schedule(0.0, optim.lr, max(warmup, 1), warmup + decay)
    elif warmup:
        lr = optax.linear_schedule(0.0, optim.lr, warmup)
    chain = []
    if optim.get("grad_clip", 0):
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    kwargs = dict(b1=optim.get("beta1", 0.9), b2=optim.get("beta2", 0.999),
                  eps=optim.get("eps", 1e-8))
    if optim.get("weight_decay", 0):
        chain.append(optax.adamw(lr, weight_decay=optim.weight_decay, **kwargs))
    else:
        chain.append(optax.adam(lr, **kwargs))
    return optax.chain(*chain)


def split(model: nnx.Module):
    """``(graphdef, params, others)``: params as a pure dict (what the state and orbax hold)."""
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), others


def merge(graphdef, params, others) -> nnx.Module:
    return nnx.merge(graphdef, params, others)


def ema_update(ema, params, rate: float):
    """theta_ema <- rate * theta_ema + (1 - rate) * theta."""
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def _finite_flags(new: State) -> dict[str, jax.Array]:
    """Per top-level entry of the state (parameters, EMA, optimiser state, ...): all finite.

    One reduction over the concatenation of an entry's leaves: a reduction per leaf, combined
    afterwards, compiled superlinearly slowly in the number of leaves on XLA:CPU."""
    flags = {}
    for k, v in new.items():
        if k in ("step", "nonfinite", "metrics"):
            continue
        leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(v)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        if leaves:
            flags[k] = jnp.all(jnp.isfinite(jnp.concatenate(leaves)))
    return flags


def guard_finite(old: State, new: State, values: dict[str, jax.Array]) -> State:
    """Keeps ``old`` (but advances ``step``) when any of ``values`` or any entry of the updated
    state ``new`` (parameters, EMA, optimiser state) is not finite.

    The first offending step, the values and which state entries were non-finite are recorded in
    ``new['nonfinite']`` for the host; the kept state is always the last finite one.

    Finiteness is one reduction per state entry (`_finite_flags`): with a reduction per leaf,
    XLA:CPU's fusion pass took time growing faster than the square of the number of leaves (a
    distillation state has ~1,400), and the distillation steps compiled for minutes
    (experiments/bench_distill.py --guard).
    """
    flags = _finite_flags(new)
    checks = [jnp.all(jnp.isfinite(v)) for v in values.values()] + list(flags.values())
    finite = jnp.all(jnp.stack(checks))
    kept = jax.tree.map(lambda a, b: jnp.where(finite, b, a), old, new)
    first = (old["nonfinite"]["step"] < 0) & ~finite
    observed = {k: v.astype(jnp.float32) for k, v in values.items()}
    observed.update({f"state/{k}": jnp.where(ok, 0.0, jnp.nan) for k, ok in flags.items()})
    record = {"step": jnp.where(first, old["step"], old["nonfinite"]["step"]),
              "values": {k: jnp.where(first, observed.get(k, 0.0), v)
                         for k, v in old["nonfinite"]["values"].items()}}
    return dict(kept, step=old["step"] + 1, nonfinite=record)


def nonfinite_record(names, state_keys=()) -> dict:
    """The device-side record of the first non-finite step: the guarded metrics ``names`` and a
    ``state/<key>`` flag per guarded state entry (NaN when that entry went non-finite)."""
    keys = list(names) + [f"state/{k}" for k in state_keys]
    return {"step": jnp.asarray(-1, jnp.int32),
            "values": {k: jnp.asarray(0.0, jnp.float32) for k in keys}}


def check_finite(state: State) -> None:
    """Raises ``NonFiniteError`` naming the step and metric if the device recorded one."""
    record = sharding.to_host(state["nonfinite"])
    step = int(record["step"])
    if step >= 0:
        shown = ", ".join(f"{k}={float(v)}" for k, v in record["values"].items()
                          if not np.isfinite(v))
        raise NonFiniteError(
            f"non-finite values at step {step}: {shown or record['values']} (state/<name>: that "
            f"part of the updated state). The update was skipped and training stopped; nothing "
            f"was written from that state. Lower the learning rate, raise gradient clipping, or "
            f"inspect the batch at that step.")


# ---------------------------------------------------------------------------------------------
# The teacher step.

def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               metric_names=("train/loss", "train/grad_norm")) -> tuple[Any, Any, State]:
    graphdef, params, others = split(model)
    state = {"step": jnp.asarray(0, jnp.int32), "params": params,
             "ema": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
             "nonfinite": nonfinite_record(metric_names, ("params", "ema", "opt_state"))}
    return graphdef, others, state


def state_shardings(state: State, mesh, mode: str = "replicated"):
    """Parameter-shaped entries follow ``mode``; scalars replicate."""
    out = {}
    for k, v in state.items():
        out[k] = (sharding.param_shardings(v, mesh, mode) if k in ("params", "ema", "opt_state")
                  else jax.tree.map(lambda _: sharding.replicated(mesh), v))
    return out


def make_teacher_step(graphdef, others, loss_fn: Callable, tx, *, ema_rate: float,
                      key: jax.Array, mesh, state_sharding):
    """One jitted step ``step(state, batch) -> (state, metrics)``: loss and grads, optax update,
    EMA, finite guard; state donated. ``key`` is passed to the compiled program as an argument
    (not baked in as a constant), so runs that differ only in their seed share one program."""

    def step_fn(step_key: jax.Array, state: State, batch) -> tuple[State, dict]:
        step_key = jax.random.fold_in(step_key, state["step"])

        def objective(params):
            return loss_fn(merge(graphdef, params, others), step_key, batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = dict(metrics, **{"train/loss": loss, "train/grad_norm": grad_norm})
        new = dict(state, params=params, opt_state=opt_state,
                   ema=ema_update(state["ema"], params, ema_rate))
        return guard_finite(state, new, {"train/loss": loss, "train/grad_norm": grad_norm}), metrics

    jitted = jax.jit(step_fn, donate_argnums=1,
                     in_shardings=(sharding.replicated(mesh), state_sharding,
                                   sharding.batch_sharding(mesh)),
                     out_shardings=(state_sharding, sharding.replicated(mesh)))
    return functools.partial(jitted, key)


# ---------------------------------------------------------------------------------------------
# The generic loop (teacher, distillation and video loops all run through it).

@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    log_every: int = 100
    ckpt_every: int = 1000
    keep_checkpoints: int = 3

    @classmethod
    def from_config(cls, section) -> "LoopConfig":
        """From a config section with ``num_steps``, ``log_every``, ``ckpt_every`` and
        optionally ``keep_checkpoints`` (``config.training`` or ``config.distill``)."""
        return cls(num_steps=int(section.num_steps), log_every=int(section.log_every),
                   ckpt_every=int(section.ckpt_every),
                   keep_checkpoints=int(section.get("keep_checkpoints", 3)))


def fit(*, workdir: str, state: State, state_sharding, step_fn: Callable[[State, int], tuple],
        loop: LoopConfig, on_log: Callable[[int, State], dict] | None = None,
        on_checkpoint: Callable[[int, State], None] | None = None,
        preview: Callable[[State], dict] | None = None, preview_every: int = 0,
        history: list | None = None, done_message: str | None = None) -> tuple[State, dict]:
    """Runs ``step_fn(state, step) -> (state, metrics)`` from the latest checkpoint to the end.

    Resumes automatically from ``workdir/checkpoints``; checks for non-finite values before every
    log and save; ``on_log`` may return extra metrics (e.g. periodic evaluation); every
    ``preview_every`` steps (at the first log step past each multiple) ``preview(state) ->
    {name: uint8 image}`` goes to TensorBoard; ``history``, if given, collects ``(step,
    metrics)`` at every log; ``done_message`` replaces the notice printed when the checkpoint
    is already at ``num_steps``.
    """
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=loop.keep_checkpoints)
    try:
        start, state = ckpt.restore_latest(state)
    except BaseException:
        ckpt.close()
        raise
    start = 0 if start is None else start
    if start:
        state = jax.device_put(state, state_sharding)
        if jax.process_index() == 0:
            print(f"resuming from step {start} of {loop.num_steps} ({ckpt.directory})",
                  flush=True)
    mon = monitor.Monitor(workdir, loop.num_steps, start_step=start)
    metrics: dict = {}
    last_log = start
    try:
        for step in range(start, loop.num_steps):
            state, metrics = step_fn(state, step)
            done = step + 1
            last = done == loop.num_steps
            if done % loop.log_every == 0 or last:
                check_finite(state)
                host = {k: float(v) for k, v in sharding.to_host(metrics).items()}
                if on_log is not None:
                    host.update(on_log(done, state))
                mon.scalars(done, host)
                if preview is not None and preview_every and (
                        done // preview_every > last_log // preview_every):
                    mon.images(done, preview(state))
                last_log = done
                metrics = host
                if history is not None:
                    history.append((done, host))
            if done % loop.ckpt_every == 0 or last:
                check_finite(state)
                ckpt.save(done, state)
                if on_checkpoint is not None:
                    on_checkpoint(done, state)
        if start >= loop.num_steps and jax.process_index() == 0:
            print(done_message or f"nothing to train: the checkpoint is at step {start} and "
                  f"num_steps is {loop.num_steps}; raise num_steps to continue.", flush=True)
    finally:
        mon.close()
        ckpt.close()
    return state, {k: float(v) for k, v in sharding.to_host(metrics).items()}
