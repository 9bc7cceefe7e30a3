"""experiments/bench_distill.py's side of the FastGen reference (experiments/fastgen_reference.py
under a torch Python), without torch: the messages when it cannot run, the request / answer
protocol and phase names, and the ours / reference ratios of the distillation cycle."""
import json
import os
import stat
import sys

import pytest

from experiments import bench_distill as bench


def fake_checkout(tmp_path):
    os.makedirs(tmp_path / "FastGen" / "fastgen", exist_ok=True)
    return str(tmp_path / "FastGen")


def test_a_directory_without_fastgen_is_named_with_the_fix(tmp_path):
    msg = bench.reference_programs(str(tmp_path), sys.executable, ["dsm"], 16, "fkl")
    assert isinstance(msg, str)
    assert "not a FastGen checkout" in msg and "git --git-dir=MIRROR archive" in msg


def test_a_divergence_fastgen_lacks_is_refused_before_starting(tmp_path):
    msg = bench.reference_programs(fake_checkout(tmp_path), sys.executable, [], 16, "pearson")
    assert isinstance(msg, str)
    assert "'pearson'" in msg and "forward_kl" in msg and "--divergences" in msg


def test_a_missing_python_is_reported(tmp_path):
    missing = str(tmp_path / "no-such-python")
    msg = bench.reference_programs(fake_checkout(tmp_path), missing, ["dsm"], 16, "fkl")
    assert isinstance(msg, str)
    assert msg.startswith("reference not started") and missing in msg


def test_a_python_that_cannot_import_the_reference_is_reported(tmp_path):
    """This Python runs the real reference script on an empty checkout: torch or FastGen's
    network fails to import, the script exits before READY, and the message says so."""
    msg = bench.reference_programs(fake_checkout(tmp_path), sys.executable, ["dsm"], 16, "fkl")
    assert isinstance(msg, str)
    assert msg.startswith("reference not importable (exit status 1")
    assert f"--reference_python={sys.executable}" in msg


FAKE_REFERENCE = r"""
import json, sys
with open(LOG, "w") as f:
    json.dump(sys.argv[1:], f)
print("READY " + json.dumps({"params": 1, "torch": "fake", "threads": 2,
                             "distill_params": {"net": 1, "discriminator": 2}}), flush=True)
times = {"dsm": 0.3, "student": 0.5, "critic": 0.25}
for line in sys.stdin:
    print(json.dumps({"wall": times[line.strip()], "cpu": 2 * times[line.strip()]}), flush=True)
"""


def test_distillation_phases_are_requested_and_named_as_ours(tmp_path):
    """A stand-in reference speaking the protocol: bench asks for --distill with FastGen's name
    of the divergence, names the answers as its own programs, and times them per request."""
    log = tmp_path / "argv.json"
    script = tmp_path / "fake_reference.py"
    script.write_text(FAKE_REFERENCE.replace("LOG", repr(str(log))))
    python = tmp_path / "python"   # runs the stand-in whatever script it is given
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    progs = bench.reference_programs(fake_checkout(tmp_path), str(python), ["dsm"], 16, "js",
                                     threads=1)
    assert not isinstance(progs, str), progs
    argv = json.loads(log.read_text())
    assert argv[0].endswith("fastgen_reference.py")
    assert "--distill" in argv and "--f_div=js" in argv and "--batch=16" in argv
    assert "--threads=1" in argv
    by = {p.name: p for p in progs}
    assert set(by) == {"dsm", "student iteration (js)", "critic iteration"}
    assert all(p.variant == "fastgen" for p in progs)
    for _ in range(3):
        for p in progs:
            p.time_once()
    assert by["student iteration (js)"].ms == pytest.approx(500.0)
    assert by["critic iteration"].cpu_ms == pytest.approx(500.0)


def program(name, wall_s, cpu_s):
    p = bench.Program(name, "x", 0.0, 0.0, 0, lambda: None)
    p.wall, p.cpu = [wall_s], [cpu_s]
    return p


def test_cycle_ratios():
    ours = {p.name: p for p in (program("student iteration (fkl)", 2.0, 3.0),
                                program("critic iteration", 1.5, 1.0))}
    theirs = {p.name: p for p in (program("student iteration (fkl)", 1.0, 1.0),
                                  program("critic iteration", 0.5, 2.0))}
    r = bench.cycle_ratios(ours, theirs, "student iteration (fkl)")
    assert r["ms"]["student"] == pytest.approx(2.0)
    assert r["ms"]["critic"] == pytest.approx(3.0)
    # (2000 + 4 * 1500) / 5 = 1600 ms against (1000 + 4 * 500) / 5 = 600 ms
    assert r["ms"]["cycle_ms"] == pytest.approx((1600.0, 600.0))
    assert r["ms"]["cycle"] == pytest.approx(1600 / 600)
    assert r["cpu_ms"]["cycle"] == pytest.approx(((3000 + 4000) / 5) / ((1000 + 8000) / 5))
    assert bench.cycle_ratios(ours, {}, "student iteration (fkl)") is None
