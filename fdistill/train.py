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
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fdistill import checkpoint, monitor, sharding

State = dict[str, Any]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Optimisation pieces shared by the teacher, distillation and video loops.

def make_optimizer(optim, *, num_steps: int | None = None) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and global-norm gradient clipping.

    ``optim`` fields: ``lr``, ``warmup`` (steps), ``beta1``, ``beta2``, ``eps``,
    ``weight_decay`` (0 gives Adam), ``grad_clip`` (0 disables).
    """
    lr = optim.lr
    if optim.get("warmup", 0):
        lr = optax.linear_schedule(0.0, optim.lr, optim.warmup)
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


def guard_finite(old: State, new: State, values: dict[str, jax.Array]) -> State:
    """Keeps ``old`` (but advances ``step``) when any of ``values`` is not finite.

    The first offending step and the values are recorded in ``new['nonfinite']`` for the host.
    """
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values.values()]))
    kept = jax.tree.map(lambda a, b: jnp.where(finite, b, a), old, new)
    first = old["nonfinite"]["step"] < 0
    record = {"step": jnp.where(~finite & first, old["step"], old["nonfinite"]["step"]),
              "values": {k: jnp.where(~finite & first, v.astype(jnp.float32),
                                      old["nonfinite"]["values"][k])
                         for k, v in values.items()}}
    return dict(kept, step=old["step"] + 1, nonfinite=record)


def nonfinite_record(names) -> dict:
    return {"step": jnp.asarray(-1, jnp.int32),
            "values": {k: jnp.asarray(0.0, jnp.float32) for k in names}}


def check_finite(state: State) -> None:
    """Raises ``NonFiniteError`` naming the step and metric if the device recorded one."""
    record = sharding.to_host(state["nonfinite"])
    step = int(record["step"])
    if step >= 0:
        shown = ", ".join(f"{k}={float(v)}" for k, v in record["values"].items()
                          if not np.isfinite(v))
        raise NonFiniteError(
            f"non-finite values at step {step}: {shown or record['values']}. The update was "
            f"skipped and training stopped; no checkpoint was written from that state. Lower the "
            f"learning rate, raise gradient clipping, or inspect the batch at that step.")


# ---------------------------------------------------------------------------------------------
# The teacher step.

def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               metric_names=("train/loss", "train/grad_norm")) -> tuple[Any, Any, State]:
    graphdef, params, others = split(model)
    state = {"step": jnp.asarray(0, jnp.int32), "params": params,
             "ema": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
             "nonfinite": nonfinite_record(metric_names)}
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
    """One jitted step: loss and grads, optax update, EMA, finite guard; state donated."""

    def step_fn(state: State, batch) -> tuple[State, dict]:
        step_key = jax.random.fold_in(key, state["step"])

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

    return jax.jit(step_fn, donate_argnums=0,
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))


# ---------------------------------------------------------------------------------------------
# The generic loop (teacher, distillation and video loops all run through it).

@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    log_every: int = 100
    ckpt_every: int = 1000
    keep_checkpoints: int = 3


def fit(*, workdir: str, state: State, state_sharding, step_fn: Callable[[State, int], tuple],
        loop: LoopConfig, on_log: Callable[[int, State], dict] | None = None,
        on_checkpoint: Callable[[int, State], None] | None = None,
        history: list | None = None) -> tuple[State, dict]:
    """Runs ``step_fn(state, step) -> (state, metrics)`` from the latest checkpoint to the end.

    Resumes automatically from ``workdir/checkpoints``; checks for non-finite values before every
    log and save; ``on_log`` may return extra metrics (e.g. periodic evaluation); ``history``,
    if given, collects ``(step, metrics)`` at every log.
    """
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=loop.keep_checkpoints)
    start, state = ckpt.restore_latest(state)
    start = 0 if start is None else start
    if start:
        logging.info("resumed from %s at step %d", ckpt.directory, start)
        state = jax.device_put(state, state_sharding)
    mon = monitor.Monitor(workdir, loop.num_steps, start_step=start)
    metrics: dict = {}
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
                metrics = host
                if history is not None:
                    history.append((done, host))
            if done % loop.ckpt_every == 0 or last:
                check_finite(state)
                ckpt.save(done, state)
                if on_checkpoint is not None:
                    on_checkpoint(done, state)
        if start >= loop.num_steps:
            logging.info("training already complete at step %d", start)
    finally:
        mon.close()
        ckpt.close()
    return state, {k: float(v) for k, v in sharding.to_host(metrics).items()}


# ---------------------------------------------------------------------------------------------
# The teacher: build, train, load, sample.

def build_model(config, *, seed: int | None = None) -> nnx.Module:
    from fdistill import models
    return models.get_model(config, rngs=nnx.Rngs(config.seed if seed is None else seed))


def train(config, workdir: str) -> dict:
    """Trains a teacher diffusion model; returns (and writes to results.json) final metrics."""
    from fdistill import data, losses
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.training.batch_size, mesh)
    ds = data.get_dataset(config.data, global_batch_size=config.training.batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          seed=config.seed)
    model = build_model(config)
    tx = make_optimizer(config.optim, num_steps=config.training.num_steps)
    graphdef, others, state = init_state(model, tx)
    shardings = state_shardings(state, mesh, config.training.get("param_sharding", "replicated"))
    state = jax.device_put(state, shardings)
    step = make_teacher_step(graphdef, others, losses.get_loss_fn(config), tx,
                             ema_rate=config.training.ema_rate,
                             key=jax.random.key(config.seed), mesh=mesh, state_sharding=shardings)

    def step_fn(state, i):
        return step(state, sharding.global_batch(ds.batch(i), mesh))

    from fdistill import evaluate
    on_log = evaluate.training_hook(config, workdir,
                                    lambda s: merge(graphdef, evaluate.local_copy(s["ema"]), others),
                                    log_every=config.training.log_every)
    t0, history = time.time(), []
    state, metrics = fit(workdir=workdir, state=state, state_sharding=shardings, step_fn=step_fn,
                         loop=_loop_config(config.training), history=history, on_log=on_log)
    results = {"mode": "train", "steps": int(sharding.to_host(state["step"])),
               "train_seconds": time.time() - t0, **{f"final/{k}": v for k, v in metrics.items()}}
    monitor.write_results(workdir, results)
    return dict(results, history=history, state=state)


def _loop_config(training) -> LoopConfig:
    return LoopConfig(num_steps=training.num_steps, log_every=training.log_every,
                      ckpt_every=training.ckpt_every,
                      keep_checkpoints=training.get("keep_checkpoints", 3))


def load_model(config, workdir: str, *, use_ema: bool = True) -> tuple[nnx.Module, int]:
    """The model of ``config`` with the (EMA) parameters of the latest good checkpoint in ``workdir``.

    Fails before compiling anything when there is no checkpoint or its shapes do not match.
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = checkpoint.Checkpointer(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if ckpt is None or not ckpt.all_steps():
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}; train one first with `python -m fdistill.main "
            f"--config=<its config> --workdir={workdir} --mode=train`")
    model = build_model(config)
    tx = make_optimizer(config.optim)
    graphdef, others, template = init_state(model, tx)
    try:
        step, state = ckpt.restore_latest(template)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"{e}. If the checkpoint is fine, check that the config's model "
                         f"matches the one it was trained with ({workdir}).") from e
    ckpt.close()
    return merge(graphdef, state["ema" if use_ema else "params"], others), step
