"""The PyTorch reference for experiments/bench_distill.py: FastGen's EDM SongUNet at the
BENCHMARKS setting, timed phase by phase on request, in its own Python environment.

Run by bench_distill (--reference=FASTGEN_CHECKOUT --reference_python=PYTHON, a Python with torch
and FastGen's requirements); it reads one phase name per line on stdin, runs that phase once and
answers with a JSON line {"wall": seconds, "cpu": process CPU seconds}, so the two frameworks are
measured in the same rounds. Phases, as bench_distill's: forward (no autograd), input_grad
(forward + gradient of the loss with respect to the noisy input), param_grad (forward + gradient
with respect to the parameters), dsm (EDM loss, backward, gradient clip 10, Adam step).

    python experiments/fastgen_reference.py --fastgen=/path/to/FastGen --batch=16  (then phases)
"""
import argparse
import json
import os
import sys
import time


def build(fastgen: str, batch: int, threads: int):
    sys.path.insert(0, fastgen)
    import torch
    from fastgen.networks.EDM.network import SongUNet, precond_input, precond_output
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, label_dim=10,
                   model_channels=32, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=4,
                   attn_resolutions=[16], dropout=0.0, embedding_type='positional',
                   channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
                   resample_filter=[1, 1])
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    sigma = (torch.randn(batch, generator=gen) * 1.2 - 1.2).exp()
    x_t = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-4)

    def denoise(x):
        xin, c_noise, _ = precond_input(x, sigma)
        return precond_output(net(xin, c_noise, labels, feature_indices=set()), x, sigma)

    def loss_of(x):
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        return (weight[:, None, None, None] * (denoise(x) - x0) ** 2).mean()

    def forward():
        with torch.no_grad():
            denoise(x_t)

    def input_grad():
        x = x_t.clone().requires_grad_(True)
        torch.autograd.grad(loss_of(x), [x])

    def param_grad():
        torch.autograd.grad(loss_of(x_t), params, allow_unused=True)

    def dsm():
        opt.zero_grad(set_to_none=True)
        loss_of(x_t).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()

    return {'forward': forward, 'input_grad': input_grad, 'param_grad': param_grad, 'dsm': dsm}, \
        sum(p.numel() for p in params), torch.__version__


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--fastgen', required=True, help='a FastGen checkout (its repository root)')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=os.cpu_count())
    args = p.parse_args()
    phases, n_params, version = build(args.fastgen, args.batch, args.threads)
    for fn in phases.values():   # warm-up
        fn()
    print('READY ' + json.dumps({'params': n_params, 'torch': version, 'threads': args.threads}),
          flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        phases[name]()
        print(json.dumps({'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0}),
              flush=True)


if __name__ == '__main__':
    main()
