"""experiments/bench_gpu.py at its tiny size on the CPU: the ADM network (ImageNet-64's) with
bfloat16 compute and rematerialisation trains and reports consistent throughput and MFU."""
import math

from experiments import bench_gpu


def test_tiny_adm_bfloat16_remat_reports_throughput_and_mfu(capsys):
    out = bench_gpu.main(['--tiny', '--networks=imagenet64', '--steps=1', '--peak_tflops=2',
                          '--compute_dtype=bfloat16', '--remat'])
    assert set(out) == {('imagenet64', 'train step'), ('imagenet64', 'denoiser evaluation (1 NFE)')}
    train, fwd = out[('imagenet64', 'train step')], out[('imagenet64', 'denoiser evaluation (1 NFE)')]
    for r in (train, fwd):
        assert r['seconds'] > 0 and math.isclose(r['images_per_s'], 4 / r['seconds'])
        assert math.isclose(r['mfu'], r['flops'] / r['seconds'] / 2e12)
    # a training step (forward, backward with the forward recomputed, Adam) costs ~3-4 forwards
    assert 2.5 < train['flops'] / fwd['flops'] < 5.0
    assert 'bfloat16, remat True; peak 2 TFLOP/s' in capsys.readouterr().out
