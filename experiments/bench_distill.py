"""f-distill cost on the benchmark network (EDM DDPM++ 32 ch), measured side by side in one process.

Network: EDM-preconditioned DDPM++ (SongUNet 32x32x3, 10 classes, 32 channels, mults (1, 2),
4 blocks, attention at 16; 1,601,091 parameters); discriminator: one head on the teacher's 16x16
features. Distillation as FastGen's CIFAR-10 f-distill config: forward-KL, 1 student update per 4
critic updates, GAN weight 1e-3, AdamW lr 1e-4 wd 1e-2, student gradient clip 10, no R1.

Prints, for each network variant (`--variants`, see experiments/xla_cpu_variants.py) and at one
batch size:
  * per network phase: forward, forward + input gradient, forward + parameter gradient, and the
    plain DSM step (EDM loss, backward, clip 10, Adam): compile seconds, median wall ms, process
    CPU ms, cores busy (CPU time / wall time), XLA's GFLOP and temporary buffer size, and ratios
    (wall and CPU) to the first variant;
  * with --distill, per distillation iteration: student (forward-KL, and JS / reverse-KL with
    --divergences), critic, the 1 + 4 cycle mean, and ratios to the DSM step;
  * with --sampling, the one-step student against the teacher's 35-evaluation Heun sampler;
  * with --guard N, the finite guard of the training steps (`train.guard_finite`) alone, over the
    first N leaves of the distillation state (their real shapes), in the library's formulation
    (one finiteness reduction per state entry) and the earlier one (one per leaf): compile
    seconds and ms per call, side by side;
  * the process's peak resident memory; and, when --reference names a FastGen checkout and torch
    imports, the PyTorch reference's network phases measured in the same rounds, and with
    --distill FastGen's own f-distill student and critic iterations (its FdistillModel on CPU,
    experiments/fastgen_reference.py says which parts are FastGen's and which are glue) with the
    first --divergences entry, in the same rounds: ours / FastGen wall and CPU ratios for the
    student iteration, the critic iteration and the 1 + 4 cycle mean, per variant. FastGen's
    method module imports boto3: `TORCH_PYTHON -m pip install boto3` if it is missing (the
    message says so).

Every program is compiled first; then `--rounds` rounds each call every program once, so all
variants see the same machine load (this CPU is shared): compare the ratios, not absolute times
across runs. The load average is printed before and after.

    PYTHONPATH=. python experiments/bench_distill.py                       # current code
    PYTHONPATH=. python experiments/bench_distill.py --variants current,pre_change
    PYTHONPATH=. python experiments/bench_distill.py --distill --sampling --rounds 5
    PYTHONPATH=. python experiments/bench_distill.py --phases= --sampling \
        --variants current,data_parallel_2
    PYTHONPATH=. python experiments/bench_distill.py --smoke --variants current,pre_change
    PYTHONPATH=. python experiments/bench_distill.py --phases= --guard 100,200,400
    PYTHONPATH=. python experiments/bench_distill.py --distill --variants current,data_parallel_2 \
        --reference=FASTGEN_CHECKOUT --reference_python=TORCH_PYTHON

Variants with `devices` > 1 (data_parallel_2: what --cpu_devices=2 does) split the batch over
that many CPU devices of this process (--host_devices, default the largest such variant's), the
others run on one of them. A FastGen checkout from a bare mirror: `git --git-dir=MIRROR archive
HEAD | tar -x -C FASTGEN_CHECKOUT`.

FastGen (PyTorch 2.14, 2 threads, batch 16) on this machine, median of 5 process runs: DSM step
329 ms, student iteration 626, critic 460, 1 + 4 cycle mean 497; single passes: forward 124 ms,
forward + input gradient 200, forward + parameter gradient 373. In the same rounds as ours at load
average 5.5-7.5 (torch 2.13): forward 258, input gradient 570, parameter gradient 721, DSM 750.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.bench_teacher import benchmark_config
from experiments.xla_cpu_variants import VARIANTS, get_variant
from fdistill import losses, models

PHASES = ("forward", "input_grad", "param_grad", "dsm")
PHASE_NAMES = {"forward": "forward", "input_grad": "forward + input gradient",
               "param_grad": "forward + parameter gradient",
               "dsm": "DSM step (EDM loss, clip, Adam)"}


@dataclasses.dataclass
class Program:
    """A compiled program and a closure that runs it once and blocks on the result."""
    name: str
    variant: str
    compile_s: float
    flops: float
    temp_bytes: int
    run: Callable[[], None]
    timer: Callable[[], tuple[float, float]] | None = None   # runs once elsewhere: (wall, cpu)
    wall: list = dataclasses.field(default_factory=list)
    cpu: list = dataclasses.field(default_factory=list)

    def time_once(self):
        if self.timer is not None:
            wall, cpu = self.timer()
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            self.run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.wall)

    @property
    def cpu_ms(self) -> float:
        return 1e3 * statistics.median(self.cpu)

    @property
    def cores(self) -> float:
        return sum(self.cpu) / sum(self.wall)


def compile_program(name: str, variant: str, fn: Callable, args: tuple, *,
                    state_argnum: int | None = None) -> Program:
    """Traces `fn` with `variant`'s formulation and compile options, compiles it and wraps it. With
    `state_argnum`, the call's first output replaces that argument for the next call (a training
    step's state)."""
    v = get_variant(variant)
    t0 = time.perf_counter()
    with v.applied():
        lowered = fn.lower(*args) if hasattr(fn, "lower") else jax.jit(fn).lower(*args)
    exe = lowered.compile(compiler_options=v.compiler_options)
    compile_s = time.perf_counter() - t0
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = exe.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    holder = list(args)

    def run():
        out = exe(*holder)
        if state_argnum is not None:
            holder[state_argnum] = out[0]
        jax.block_until_ready(out)

    run()   # warm-up (and the first state update)
    return Program(name, variant, compile_s, flops, temp, run)


def network_config(smoke: bool):
    c = benchmark_config()
    if smoke:                                   # a much smaller network, to check the script
        c.model.model_channels, c.model.num_blocks = 16, 1
    return c


def variant_mesh(variant: str):
    """A 1-D ``data`` mesh over the first `devices` devices of `variant` (the batch is split over
    it, the parameters replicated)."""
    from fdistill import sharding
    n = get_variant(variant).devices
    if n > jax.device_count():
        raise ValueError(f"variant {variant!r} splits the batch over {n} devices, this process has "
                         f"{jax.device_count()}: pass --host_devices {n}")
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), (sharding.DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def network_programs(config, variant: str, phases, batch: int) -> list[Program]:
    """The per-network phases on the teacher alone (no distillation code involved)."""
    from fdistill import sharding
    den = models.get_model(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(den)
    process = den.process
    mesh = variant_mesh(variant)
    params = jax.device_put(params, sharding.replicated(mesh))
    key = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
    k_x, k_s, k_n = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.uniform(k_x, (batch, 32, 32, 3), minval=-1.0, maxval=1.0)
    labels = jax.nn.one_hot(jnp.arange(batch) % 10, 10)
    sigma = process.sample_training_sigma(k_s, batch)
    x_t = x0 + sigma[:, None, None, None] * jax.random.normal(k_n, x0.shape)
    data = jax.device_put(dict(x0=x0, labels=labels, sigma=sigma), sharding.batch_sharding(mesh))
    x_t = jax.device_put(x_t, sharding.batch_sharding(mesh))

    def forward(params, x_t, data):
        return nnx.merge(graphdef, params)(x_t, data["sigma"], data["labels"])

    def loss(params, x_t, data):
        return jnp.mean(jnp.square(forward(params, x_t, data) - data["x0"]))

    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-4))

    def dsm_step(state, key, data):
        params, opt_state = state

        def loss_fn(params):
            per_example, _ = losses.edm_losses(nnx.merge(graphdef, params), process, key,
                                               data["x0"], data["labels"])
            return per_example.mean()

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    fns = {"forward": (forward, (params, x_t, data), None),
           "input_grad": (jax.grad(loss, argnums=1), (params, x_t, data), None),
           "param_grad": (jax.grad(loss), (params, x_t, data), None),
           "dsm": (dsm_step, ((params, tx.init(params)), key, data), 0)}
    out = []
    for phase in phases:
        fn, args, state_argnum = fns[phase]
        out.append(compile_program(phase, variant, lambda *a, fn=fn: fn(*a), args,
                                   state_argnum=state_argnum))
    return out


def distillation_programs(config, variant: str, divergences, batch: int, sampling: bool,
                          compile_steps: bool = True) -> tuple[list[Program], dict]:
    """The f-distill student and critic iterations (and samplers) through the library's
    distillation API. This is the one place that API is used: re-point it here when it changes.
    With ``compile_steps=False`` the steps are not compiled: only the state is built
    (``info['state_shapes']``), and the samplers with ``sampling``."""
    from configs.distill_base import add_distill, optim
    from fdistill import modes, sampling as sampling_lib, sharding

    def distill_config(divergence):
        c = add_distill(config.copy_and_resolve_references(), divergence=divergence)
        c.seed = 0
        d = c.distill
        d.disc_resolutions = (16,)
        d.student_update_every = 5
        d.gan_weight = 1e-3
        d.r1_weight = 0.0
        d.student_optim = optim(1e-4, weight_decay=1e-2, grad_clip=10.0)
        d.fake_score_optim = optim(1e-4, weight_decay=1e-2, grad_clip=0.0)
        d.disc_optim = optim(1e-4, weight_decay=1e-2, grad_clip=0.0)
        d.batch_size = batch
        return c

    mesh = variant_mesh(variant)
    key = jax.random.key(0)
    x = np.asarray(jax.random.uniform(key, (batch, 32, 32, 3), minval=-1.0, maxval=1.0))
    labels = np.asarray(jax.nn.one_hot(np.arange(batch) % 10, 10))
    gbatch = sharding.global_batch({"x": x, "label": labels}, mesh)
    teacher = modes.build_model(distill_config("fkl"))
    out, info = [], {}
    for div in divergences:
        dist = modes.build_distillation(distill_config(div), teacher, mesh)
        info["disc_params"] = sum(v.size for v in jax.tree.leaves(dist.initial_state["disc"]))
        info["state_shapes"] = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                            dist.initial_state)
        if not compile_steps and not sampling:
            return out, info
        kinds = ("student", "critic") if div == divergences[0] else ("student",)
        kinds = kinds if compile_steps else ()
        for kind in kinds:
            step = getattr(dist, f"{kind}_step")
            name = f"{kind} iteration" + (f" ({div})" if kind == "student" else "")
            out.append(compile_program(name, variant, step,
                                       (jax.tree.map(jnp.copy, dist.initial_state),
                                        dist.teacher_params, gbatch, dist.key),
                                       state_argnum=0))
        if sampling and div == divergences[0]:
            devices = list(mesh.devices.flat)     # the variant's devices split the batch
            draw = modes.student_draw(distill_config(div), dist, batch, devices=devices)
            out.append(compile_program("one-step student sampler", variant, draw,
                                       draw.place(dist.teacher_params, key, jnp.asarray(labels))))
            graphdef, params, others = nnx.split(teacher, nnx.Param, ...)
            heun = sampling_lib.get_sampler("heun", num_steps=18)

            def heun_draw(params, key):
                x, nfe = heun(nnx.merge(graphdef, params, others), teacher.process, key,
                              (batch, 32, 32, 3), jnp.asarray(labels))
                info["heun_nfe"] = nfe
                return x

            heun_split = sharding.SplitBatch(heun_draw, batch, devices=devices)
            out.append(compile_program("teacher Heun sampler", variant, heun_split,
                                       heun_split.place(params, key)))
    return out, info


def guard_per_leaf(old, new, values):
    """`train.guard_finite` as it was: a finiteness reduction per leaf, combined by a stack
    (XLA:CPU's fusion pass took time superlinear in the number of leaves on this one)."""
    flags = {}
    for k, v in new.items():
        if k in ("step", "nonfinite", "metrics"):
            continue
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(v)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        if leaves:
            flags[k] = jnp.all(jnp.stack(leaves))
    checks = [jnp.all(jnp.isfinite(v)) for v in values.values()] + list(flags.values())
    finite = jnp.all(jnp.stack(checks))
    kept = jax.tree.map(lambda a, b: jnp.where(finite, b, a), old, new)
    return dict(kept, step=old["step"] + 1)


def guard_programs(shapes: dict, sizes) -> list[Program]:
    """The finite guard alone on the first n leaves of a state shaped as `shapes` (for each n in
    `sizes`), as the library does it and as it did (`guard_per_leaf`); the update it guards is
    one multiply-add."""
    state = jax.tree.map(lambda v: jnp.full(v.shape, 0.5, v.dtype), shapes)
    update = lambda s: jax.tree.map(
        lambda x: x * 0.999 + 1e-6 if jnp.issubdtype(x.dtype, jnp.inexact) else x, s)
    from fdistill import train
    entries = [k for k in state if k not in ("step", "nonfinite", "metrics")]
    leaves = [(k, i, x) for k in entries for i, x in enumerate(jax.tree.leaves(state[k]))]
    out = []
    for n in sizes:
        picked = leaves[:n]
        sub = {"step": jnp.asarray(0, jnp.int32),
               "nonfinite": train.nonfinite_record(["loss"], entries)}
        for k in entries:
            sub[k] = {f"{i}": jnp.copy(x) for kk, i, x in picked if kk == k}
        sub = {k: v for k, v in sub.items() if not isinstance(v, dict) or v}

        def current(s):
            new = update(s)
            new["step"], new["nonfinite"] = s["step"], s["nonfinite"]
            return train.guard_finite(s, new, {"loss": jnp.asarray(1.0)}), None

        def earlier(s):
            new = update(s)
            new["step"] = s["step"]
            return guard_per_leaf(s, new, {"loss": jnp.asarray(1.0)}), None

        for label, fn in (("current", current), ("per_leaf", earlier)):
            prog = compile_program(f"finite guard, {n} leaves", "current",
                                   jax.jit(fn, donate_argnums=0), (jax.tree.map(jnp.copy, sub),),
                                   state_argnum=0)
            prog.variant = label
            out.append(prog)
            print(f"compiled finite guard, {n} leaves, {label}: {prog.compile_s:.1f} s", flush=True)
    return out


# fdistill's divergence names (canonical, fdistill.divergences) -> FastGen's f_div names.
FASTGEN_F_DIV = {"forward_kl": "kl", "reverse_kl": "rkl", "jensen_shannon": "js",
                 "softened_reverse_kl": "sf", "neyman_chi2": "neyman", "squared_hellinger": "sh",
                 "jeffreys": "jf"}
REFERENCE_DISTILL = {"student": "student iteration ({div})", "critic": "critic iteration"}


def reference_programs(fastgen: str, python: str, phases, batch: int,
                       distill_divergence: str | None = None,
                       threads: int = 0) -> list[Program] | str:
    """FastGen's (PyTorch) network phases, run by experiments/fastgen_reference.py under `python`
    (a Python with torch and FastGen's requirements) and timed there on each request, so they
    share the rounds with ours; or the reason they cannot run. With `distill_divergence` (one of
    fdistill's divergence names) also FastGen's f-distill student and critic iterations with that
    divergence, named as ours ('student iteration (<name>)', 'critic iteration'). ``threads``:
    torch's intra-op threads (0: the reference script's default, every CPU)."""
    from fdistill import divergences
    if not os.path.isdir(os.path.join(fastgen, "fastgen")):
        return (f"reference not run: --reference={fastgen} is not a FastGen checkout (no fastgen/ "
                f"package in it); make one from the mirror with `git --git-dir=MIRROR archive HEAD "
                f"| tar -x -C DIR` and pass --reference=DIR")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastgen_reference.py")
    args = [python, script, f"--fastgen={fastgen}", f"--batch={batch}"]
    args += [f"--threads={threads}"] if threads else []
    names = {phase: phase for phase in phases}
    if distill_divergence is not None:
        canonical = divergences.ALIASES.get(distill_divergence, distill_divergence)
        if canonical not in FASTGEN_F_DIV:
            return (f"reference not run: FastGen's f-distill has no divergence "
                    f"{distill_divergence!r} (it has {', '.join(FASTGEN_F_DIV)}); put one of them first in --divergences")
        args += ["--distill", f"--f_div={FASTGEN_F_DIV[canonical]}"]
        names.update({k: v.format(div=distill_divergence) for k, v in REFERENCE_DISTILL.items()})
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        return f"reference not started ({e}; --reference_python={python})"
    ready = proc.stdout.readline()
    if not ready.startswith("READY "):
        proc.kill()
        proc.wait()
        return (f"reference not importable (exit status {proc.returncode}; see its error above; "
                f"--reference_python={python} needs torch and FastGen's requirements)")
    info = json.loads(ready[len("READY "):])
    print(f"reference: FastGen SongUNet, {info['params']:,} parameters, torch {info['torch']}, "
          f"{info['threads']} threads", flush=True)
    if "distill_params" in info:
        print(f"reference: FastGen FdistillModel, student {info['distill_params']['net']:,} and "
              f"discriminator {info['distill_params']['discriminator']:,} parameters", flush=True)

    def ask(phase):
        proc.stdin.write(phase + "\n")
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        return answer["wall"], answer["cpu"]

    return [Program(name, "fastgen", 0.0, 0.0, 0, lambda: None, timer=lambda p=phase: ask(p))
            for phase, name in names.items()]


def cycle_ratios(ours: dict, theirs: dict, student: str) -> dict | None:
    """Ours / the reference's median wall and CPU time for the student iteration, the critic
    iteration and the 1 + 4 cycle mean ((student + 4 critic) / 5), from {name: Program} of each;
    None when either lacks one of the two iterations."""
    names = {"student": student, "critic": "critic iteration"}
    if not all(n in ours and n in theirs for n in names.values()):
        return None
    out = {}
    for key in ("ms", "cpu_ms"):
        get = lambda progs, k: getattr(progs[names[k]], key)
        cyc = lambda progs: (get(progs, "student") + 4 * get(progs, "critic")) / 5
        out[key] = {"student": get(ours, "student") / get(theirs, "student"),
                    "critic": get(ours, "critic") / get(theirs, "critic"),
                    "cycle": cyc(ours) / cyc(theirs), "cycle_ms": (cyc(ours), cyc(theirs))}
    return out


def print_table(title: str, programs: list[Program], variants: list[str], ref_name: str | None):
    print(f"\n{title}")
    print(f"{'':38s} {'variant':16s} {'compile s':>9s} {'ms':>8s} {'cpu ms':>8s} {'cores':>5s} "
          f"{'ms/1st':>6s} {'cpu/1st':>7s} {'GFLOP':>6s} {'temp MB':>7s}"
          + (f" {'/ ' + ref_name:>10s}" if ref_name else ""))
    by = {(p.name, p.variant): p for p in programs}
    names = list(dict.fromkeys(p.name for p in programs))
    for name in names:
        first = by.get((name, variants[0]))
        ref = by.get((ref_name, variants[0])) if ref_name else None
        for v in variants:
            p = by.get((name, v))
            if p is None:
                continue
            rel = (f"{p.ms / first.ms:6.2f} {p.cpu_ms / first.cpu_ms:7.2f}" if first
                   else f"{'':6s} {'':7s}")
            line = (f"{name:38s} {v:16s} {p.compile_s:9.1f} {p.ms:8.1f} {p.cpu_ms:8.1f} "
                    f"{p.cores:5.2f} {rel} {p.flops / 1e9:6.1f} {p.temp_bytes / 2**20:7.1f}")
            if ref is not None:
                line += f" {p.ms / ref.ms:10.2f}"
            print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed calls of every program")
    p.add_argument("--variants", default="current",
                   help=f"comma-separated, ratios are to the first; one of: {', '.join(VARIANTS)}")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"network phases to time (comma-separated; empty for none): {', '.join(PHASES)}")
    p.add_argument("--distill", action="store_true", help="also the distillation iterations")
    p.add_argument("--divergences", default="fkl",
                   help="student iterations to time with --distill (the first also times the critic)")
    p.add_argument("--sampling", action="store_true",
                   help="one-step student vs 35-NFE Heun sampling (without --distill: only "
                        "the samplers are compiled)")
    p.add_argument("--reference", default="",
                   help="a FastGen checkout: time its network's phases in the same rounds")
    p.add_argument("--reference_python", default=sys.executable,
                   help="the Python (with torch and FastGen's requirements) that runs it")
    p.add_argument("--reference_threads", type=int, default=0,
                   help="torch threads of the reference (default: every CPU); on a CPU shared "
                        "with other jobs, 1 keeps its threads from waiting on each other")
    p.add_argument("--host_devices", type=int, default=0,
                   help="CPU devices of this process (jax_num_cpu_devices); variants with "
                        "devices > 1 split the batch over that many")
    p.add_argument("--smoke", action="store_true", help="16 channels, 1 block: checks the script")
    p.add_argument("--guard", default="",
                   help="leaf counts (comma-separated) at which to time the finite guard alone, "
                        "the library's formulation against the per-leaf one, on the "
                        "distillation state's leaves (built, not compiled, without --distill)")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        get_variant(v)
    host_devices = args.host_devices or max(get_variant(v).devices for v in variants)
    if host_devices > 1:
        jax.config.update("jax_num_cpu_devices", host_devices)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    bad = [s for s in phases if s not in PHASES]
    if bad:
        raise ValueError(f"Unknown phases {bad}; valid: {', '.join(PHASES)}.")
    if args.reference and args.smoke:
        raise ValueError("--reference times FastGen's network at the BENCHMARKS setting; drop "
                         "--smoke to compare like with like.")
    print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    config = network_config(args.smoke)
    den = models.get_model(config, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(den, nnx.Param)))
    net, dist, guard, info = [], [], [], {}
    for v in variants:
        net += network_programs(config, v, phases, args.batch)
        if args.distill or args.sampling:
            progs, info = distillation_programs(
                config, v, [d.strip() for d in args.divergences.split(",")], args.batch,
                args.sampling, compile_steps=args.distill)
            dist += progs
        if args.guard and v == variants[0]:
            if not args.distill:
                _, info = distillation_programs(config, v, ["fkl"], args.batch, False,
                                                compile_steps=False)
            guard = guard_programs(info["state_shapes"], [int(n) for n in args.guard.split(",")])
        print(f"compiled variant {v}", flush=True)
    first_div = args.divergences.split(",")[0].strip()
    ref = (reference_programs(args.reference, args.reference_python, phases, args.batch,
                              first_div if args.distill else None, args.reference_threads)
           if args.reference and (phases or args.distill) else None)
    if isinstance(ref, str):
        print(ref)
        ref = None
    everything = net + dist + guard + (ref or [])
    for _ in range(args.rounds):
        for prog in everything:
            prog.time_once()

    setting = "smoke, NOT the" if args.smoke else "the"
    print(f"\nDDPM++ ({setting} benchmark setting), {n_params:,} parameters, batch {args.batch}, "
          f"float32, median of {args.rounds} interleaved rounds")
    ref_net = [p for p in ref or [] if p.name in PHASES]
    ref_dist = [p for p in ref or [] if p.name not in PHASES]
    if net:
        print_table("network phases", net + ref_net, variants + (["fastgen"] if ref_net else []),
                    None)
    if ref_net:
        theirs = {p.name: p for p in ref_net}
        for v in variants:
            ours = {p.name: p for p in net if p.variant == v}
            print(f"{v} / FastGen (wall, cpu): " + ", ".join(
                f"{PHASE_NAMES[k]} {ours[k].ms / theirs[k].ms:.2f}, "
                f"{ours[k].cpu_ms / theirs[k].cpu_ms:.2f}" for k in phases if k in ours and k in theirs))
    if dist:
        dsm = {p.variant: p for p in net if p.name == "dsm"}
        print_table("distillation iterations" if args.distill else "samplers", dist + ref_dist,
                    variants + (["fastgen"] if ref_dist else []), None)
        theirs = {p.name: p for p in ref_dist}
        for v in variants:
            by = {p.name: p for p in dist if p.variant == v}
            critic, student = by.get("critic iteration"), by.get(f"student iteration ({first_div})")
            if critic and student:
                cycle = (student.ms + 4 * critic.ms) / 5
                line = f"{v}: 1 + 4 cycle mean {cycle:.1f} ms"
                if v in dsm:
                    line += (f"; per DSM step: student {student.ms / dsm[v].ms:.2f}, critic "
                             f"{critic.ms / dsm[v].ms:.2f}, cycle {cycle / dsm[v].ms:.2f}")
                print(line)
            r = cycle_ratios(by, theirs, f"student iteration ({first_div})")
            if r:
                w, c = r["ms"], r["cpu_ms"]
                print(f"{v} / FastGen f-distill (wall, cpu): student iteration {w['student']:.2f}, "
                      f"{c['student']:.2f}; critic iteration {w['critic']:.2f}, {c['critic']:.2f}; "
                      f"1 + 4 cycle {w['cycle']:.2f}, {c['cycle']:.2f} ({w['cycle_ms'][0]:.1f} / "
                      f"{w['cycle_ms'][1]:.1f} ms)")
            one, heun = by.get("one-step student sampler"), by.get("teacher Heun sampler")
            if one and heun:
                print(f"{v}: sampling batch {args.batch}: one-step {one.ms:.1f} ms "
                      f"({args.batch / one.ms * 1e3:.1f} img/s), Heun {info.get('heun_nfe')} NFE "
                      f"{heun.ms:.1f} ms ({args.batch / heun.ms * 1e3:.1f} img/s), "
                      f"speed-up {heun.ms / one.ms:.1f}x")
    if guard:
        n_leaves = len(jax.tree.leaves(info["state_shapes"]))
        print_table(f"finite guard alone (the distillation state has {n_leaves} leaves)", guard,
                    ["current", "per_leaf"], None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\npeak resident memory of this process {rss:.0f} MB (all programs together); "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
