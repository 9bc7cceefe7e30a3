"""Command line: flags -> config -> one mode. Nothing else lives here.

    python -m fdistill.main --config=configs/toy.py --workdir=runs/toy --mode=train
    python -m fdistill.main --config=configs/toy.py --workdir=runs/toy --mode=sample \
        --config.sampling.sampler=pc

On a multi-core CPU, --cpu_devices=N (or FDISTILL_CPU_DEVICES=N, or the config's cpu_devices)
shards the batch over N CPU devices, each running its share as its own program; 0 means one per
core (the image configs' default: their U-Nets step faster so; the toys' small steps do not).

Multi-host: pass --coordinator_address=host:port --num_processes=N --process_id=i, or
--distributed to let JAX auto-detect the cluster (TPU pods, SLURM, Open MPI).
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from fdistill import compilation_cache, errors, modes, quickstart, sharding, validation
from fdistill import workdir as workdir_lib

# mode -> fn(config, workdir) -> results dict
MODES = {
    "train": modes.train_mode,
    "sample": modes.sample,
    "likelihood": modes.likelihood,
    "distill": modes.distill,
    "fid_stats": modes.fid_stats,
    "eval": modes.evaluate,
    "quickstart": quickstart.run,
    "import_edm": modes.import_edm,
}

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples, results.json.")
flags.DEFINE_string("mode", "train", f"One of: {', '.join(MODES)}.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed with cluster auto-detection.")
flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process' id.")
flags.DEFINE_integer("distributed_timeout", sharding.DEFAULT_DISTRIBUTED_TIMEOUT_S,
                     "Multi-host: seconds to wait for every process to join.")
flags.DEFINE_bool("verbose", False, "Print the full traceback of an error.")
flags.DEFINE_bool("compilation_cache", True,
                  "Keep compiled programs on disk (FDISTILL_COMPILATION_CACHE: a directory, or 0 "
                  "for off) so that a rerun or a resumed run does not compile again.")
flags.DEFINE_integer("cpu_devices", None,
                     "Split the CPU into this many JAX devices and shard the batch over them "
                     "(faster for convolutional networks on a multi-core CPU; the batch sizes must "
                     "be multiples of it); 0: one per core, as many as divide the batch sizes. "
                     f"Default: ${sharding.CPU_DEVICES_ENV}, else the config's cpu_devices.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run(config, workdir: str, mode: str) -> dict:
    """Runs ``mode`` (a key of ``MODES``) and returns its results dict: the config is validated
    before anything compiles, and the workdir is locked against a second run."""
    if mode not in MODES:
        raise errors.ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    validation.validate(config, mode)
    if mode == "distill":
        workdir_lib.check_not_teacher_workdir(workdir, config.distill.get("teacher_workdir", ""))
    with workdir_lib.lock(workdir, mode=mode):
        return MODES[mode](config, workdir)


def cpu_devices_for(config, mode: str, flag: int | None = None, *,
                    multi_process: bool = False) -> int:
    """How many CPU devices this run splits the CPU into: ``--cpu_devices``, else
    ``$FDISTILL_CPU_DEVICES``, else ``config.cpu_devices``; 0 resolved to one per core, as many as
    divide the batches ``mode`` shards (``sharding.resolve_cpu_devices``)."""
    requested = flag
    if requested is None:
        requested = sharding.cpu_devices_from_env()
    if requested is None:
        requested = config.get("cpu_devices", 1)
    return sharding.resolve_cpu_devices(requested, modes.sharded_batch_sizes(config, mode),
                                        multi_process=multi_process)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    multi_process = bool(FLAGS.distributed or FLAGS.coordinator_address
                         or (FLAGS.num_processes or 1) > 1)
    cpu_devices = errors.cli_errors(cpu_devices_for, FLAGS.config, FLAGS.mode, FLAGS.cpu_devices,
                                    multi_process=multi_process, verbose=FLAGS.verbose)
    if cpu_devices != 1:
        errors.cli_errors(sharding.set_cpu_devices, cpu_devices, verbose=FLAGS.verbose)
    if FLAGS.compilation_cache:
        compilation_cache.enable()
    if FLAGS.distributed or FLAGS.coordinator_address:
        errors.cli_errors(sharding.initialize_distributed, FLAGS.coordinator_address,
                          FLAGS.num_processes, FLAGS.process_id,
                          timeout_s=FLAGS.distributed_timeout, verbose=FLAGS.verbose)
    errors.cli_errors(run, FLAGS.config, FLAGS.workdir, FLAGS.mode, verbose=FLAGS.verbose)


if __name__ == "__main__":
    app.run(main)
