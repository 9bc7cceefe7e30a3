"""The PyTorch reference for experiments/bench_distill.py: FastGen's EDM SongUNet at the
BENCHMARKS setting, timed phase by phase on request, in its own Python environment.

Run by bench_distill (--reference=FASTGEN_CHECKOUT --reference_python=PYTHON, a Python with torch
and FastGen's requirements); it reads one phase name per line on stdin, runs that phase once and
answers with a JSON line {"wall": seconds, "cpu": process CPU seconds}, so the two frameworks are
measured in the same rounds. Phases, as bench_distill's: forward (no autograd), input_grad
(forward + gradient of the loss with respect to the noisy input), param_grad (forward + gradient
with respect to the parameters), dsm (EDM loss, backward, gradient clip 10, Adam step); with
--distill also `student` and `critic`, one f-distill iteration each (below).

The distillation iterations run FastGen's own method class, `FdistillModel`
(fastgen/methods/distribution_matching/f_distill.py, a `DMD2Model`), built on CPU around FastGen's
`EDMPrecond` (SongUNet) at the BENCHMARKS setting and FastGen's `Discriminator_EDM` with one head
on the 16x16 features (feature index 1, 64 channels: 197,249 parameters, as ours). FastGen's code
does: network construction, the student / teacher / fake-score / discriminator calls, the time
and noise sampling (`sample_t`, polynomial), the f-divergence weighting with ratio normalisation,
every loss (`variational_score_distillation_loss`, `gan_loss_generator`,
`denoising_score_matching_loss`, `gan_loss_discriminator`), the requires-grad switching, its
AdamW optimisers and LambdaLR schedulers (`optimizers_schedulers_step`, `optimizers_zero_grad`).
Glue here, because FastGen's config tree (`fastgen.configs.config`) and trainer import wandb,
torchvision, timm and hydra, which its CPU environment here lacks:
  * the config: a plain namespace with the values of FastGen's CIFAR-10 f-distill recipe
    (configs/methods/config_dmd2.py, config_f_distill.py,
    experiments/EDM/config_f_distill_cifar10.py:
    forward-KL 'kl', ratio clip [0.1, 20], ratio normalisation over 10 bins with EMA rate 0, 1
    student update per 5 iterations, GAN weight 1e-3, no R1, AdamW lr 1e-4 wd 1e-2, no warm-up,
    polynomial t sampling on [0.002, 80]) and the network and discriminator at the BENCHMARKS
    size, no pretrained file (the student and fake score start from the teacher's random weights,
    as FastGen's loading from a pretrained teacher does);
  * one training iteration as FastGen's `Trainer.train_step` does it without DDP: the method's
    `single_train_step` under its autocast, `total_loss.backward()` (no grad scaler in float32,
    one accumulation round), then what `GradClipCallback(grad_norm=10, model_key='net')` does
    before the optimiser step (count non-finite gradients of the student, clip its norm to 10 with
    `clip_grad_norm_(foreach=True)`), the method's optimiser / scheduler step and zero-grad, and
    what one constant `EMACallback` (beta 0.9999) does after it (lerp the student into its EMA;
    FastGen's CIFAR-10 recipe keeps three, fdistill's one).

    python experiments/fastgen_reference.py --fastgen=/path/to/FastGen --batch=16  (then phases)
"""
import argparse
import json
import math
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


BENCHMARK_NET = dict(img_resolution=32, img_channels=3, label_dim=10, sigma_shift=0.0,
                     sigma_data=0.5, model_type='SongUNet', model_channels=32, channel_mult=[1, 2],
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=[16],
                     channel_mult_noise=1, embedding_type='positional', encoder_type='standard',
                     decoder_type='standard', resample_filter=[1, 1], dropout=0.0,
                     label_dropout=0, r_timestep=False, drop_precond=None)


def distill_config(fastgen_modules, ema_rate: float):
    """The namespace FdistillModel reads (see the module docstring: FastGen's CIFAR-10 f-distill
    values, the BENCHMARKS network)."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    L = fastgen_modules['LazyCall']
    optimizer = lambda: L(fastgen_modules['get_optimizer'])(
        model=None, optim_type='adamw', lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
        fused=False)
    scheduler = lambda: L(fastgen_modules['LambdaLinearScheduler'])(
        warm_up_steps=[0], cycle_lengths=[10000000000], f_start=[1e-06], f_max=[1.0], f_min=[1.0])
    return SimpleNamespace(
        net=L(fastgen_modules['EDMPrecond'])(**BENCHMARK_NET), teacher=None,
        guidance_scale=None, skip_layers=None,
        net_optimizer=optimizer(), net_scheduler=scheduler(),
        fake_score_optimizer=optimizer(), fake_score_scheduler=scheduler(),
        discriminator=L(fastgen_modules['Discriminator_EDM'])(
            feature_indices={1}, all_res=[32, 16], in_channels=64),
        discriminator_optimizer=optimizer(), discriminator_scheduler=scheduler(),
        sample_t_cfg=OmegaConf.create(dict(
            time_dist_type='polynomial', train_p_mean=-1.1, train_p_std=2.0, shift=5.0,
            min_t=0.002, max_t=80.0, t_list=None, log_t_df=0.01)),
        input_shape=[3, 32, 32], device='cpu',
        grad_scaler_enabled=False, grad_scaler_init_scale=65536.0,
        grad_scaler_growth_interval=2000,
        pretrained_model_path='', pretrained_student_net_path='', load_student_weights=True,
        enable_preprocessors=True, use_ema=['ema_9999'], student_sample_steps=1,
        student_sample_type='sde', fsdp_meta_init=False, add_teacher_to_fsdp_dict=True,
        ddp_find_unused_parameters=True, precision='float32', precision_amp=None,
        precision_amp_infer=None, precision_amp_enc=None, precision_fsdp=None,
        student_update_freq=5, gan_loss_weight_gen=0.001, gan_use_same_t_noise=False,
        fake_score_pred_type=None, gan_r1_reg_weight=0.0, gan_r1_reg_alpha=0.1,
        f_distill=SimpleNamespace(f_div='kl', ratio_lower=0.1, ratio_upper=20.0,
                                  ratio_normalization=True, bin_num=10, ratio_ema_rate=0.0),
        ema_rate=ema_rate)


def build_distill(batch: int, f_div: str = 'kl'):
    """FastGen's FdistillModel on CPU and its student and critic iterations (see the module
    docstring for which parts are FastGen's and which are glue). `build` put the checkout on
    sys.path and set the threads."""
    import torch
    try:
        from fastgen.methods import FdistillModel
        from fastgen.networks.EDM.network import EDMPrecond
        from fastgen.networks.discriminators import Discriminator_EDM
        from fastgen.configs.opt import get_optimizer
        from fastgen.utils import LazyCall
        from fastgen.utils.lr_scheduler import LambdaLinearScheduler
    except ModuleNotFoundError as e:
        raise SystemExit(f"FastGen's f-distill method code does not import: {e}. Install the "
                         f"missing package into this Python (e.g. `{sys.executable} -m pip "
                         f"install {e.name}`; FastGen's model module imports boto3 at load "
                         f"time).") from e
    from fastgen.utils.logging_utils import set_log_level
    set_log_level('WARNING')   # its INFO / DEBUG lines at every construction step
    config = distill_config(dict(LazyCall=LazyCall, get_optimizer=get_optimizer,
                                 LambdaLinearScheduler=LambdaLinearScheduler,
                                 EDMPrecond=EDMPrecond, Discriminator_EDM=Discriminator_EDM),
                            ema_rate=0.9999)
    config.f_distill.f_div = f_div
    torch.manual_seed(0)
    model = FdistillModel(config)
    # A pretrained teacher would be loaded into the student and fake score (DMD2Model.build_model,
    # FastGenModel.load_student_weights_and_ema); with none, give them the teacher's weights.
    model.net.load_state_dict(model.teacher.state_dict(), strict=False)
    model.fake_score.load_state_dict(model.teacher.state_dict())
    for name in model.use_ema:
        getattr(model, name).load_state_dict(model.net.state_dict(), strict=False)
    model.on_train_begin(is_fsdp=False)
    model.init_optimizers()
    gen = torch.Generator().manual_seed(0)
    data = {'real': torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1,
            'condition': torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float(),
            'neg_condition': None}
    counter = {'student': 0, 'critic': 1}   # iteration numbers: multiples of 5 update the student

    def train_iteration(iteration):
        # Trainer.train_step (no DDP, one accumulation round, no grad scaler in float32)
        with model.autocast():
            loss_map, _ = model.single_train_step(data, iteration)
        loss_map['total_loss'].backward()
        # GradClipCallback(grad_norm=10.0, model_key='net').on_optimizer_step_begin
        nonfinite = sum(p.grad.numel() - p.grad.isfinite().sum().item()
                        for p in model.net.parameters() if p.grad is not None)
        total = torch.nn.utils.clip_grad_norm_(model.net.parameters(), 10.0, foreach=True)
        total.item()
        model.optimizers_schedulers_step(iteration)
        model.optimizers_zero_grad(iteration)
        # EMACallback(type='constant', beta=0.9999).on_training_step_end
        with torch.no_grad():
            for name in model.use_ema:
                ema = getattr(model, name).state_dict()
                for key, p in model.net.named_parameters():
                    ema[key].lerp_(p, 1.0 - config.ema_rate)
                for key, b in model.net.named_buffers():
                    if key in ema:
                        ema[key].copy_(b)
        loss = loss_map['total_loss'].detach().item()
        if not math.isfinite(loss) or nonfinite:
            raise RuntimeError(f"FastGen's iteration {iteration}: loss {loss}, {nonfinite} "
                               f"non-finite student gradients")
        return loss

    def student():
        counter['student'] += 5
        train_iteration(counter['student'])

    def critic():
        counter['critic'] += 1 + (counter['critic'] % 5 == 4)   # skip the student's iterations
        train_iteration(counter['critic'])

    n_params = {k: sum(p.numel() for p in getattr(model, k).parameters())
                for k in ('net', 'discriminator')}
    return {'student': student, 'critic': critic}, n_params


def main():
    # The answers go to the real stdout; everything else printed (FastGen's loguru sink is
    # sys.stdout at import time) goes to stderr, so it cannot break the protocol.
    protocol, sys.stdout = sys.stdout, sys.stderr
    p = argparse.ArgumentParser()
    p.add_argument('--fastgen', required=True, help='a FastGen checkout (its repository root)')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--distill', action='store_true',
                   help="also FastGen's f-distill student and critic iterations")
    p.add_argument('--f_div', default='kl',
                   help="with --distill: FastGen's f-divergence name (kl: forward-KL, rkl, js, "
                        "sf, ...)")
    args = p.parse_args()
    phases, n_params, version = build(args.fastgen, args.batch, args.threads)
    info = {'params': n_params, 'torch': version, 'threads': args.threads}
    if args.distill:
        distill, info['distill_params'] = build_distill(args.batch, args.f_div)
        phases.update(distill)
    for fn in phases.values():   # warm-up
        fn()
    print('READY ' + json.dumps(info), file=protocol, flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        phases[name]()
        print(json.dumps({'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0}),
              file=protocol, flush=True)


if __name__ == '__main__':
    main()
