"""Fields every fdistill config has; dataset bases and experiment overrides start from here."""
import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # CPU devices the batch is split over (--cpu_devices overrides): 1, or 0 for one per core (as
    # many as divide the batch sizes). Splitting pays for convolutional networks, whose steps run
    # much of their elementwise work on one thread per device; a toy MLP's short steps do not gain.
    c.cpu_devices = 1

    c.data = d = ml_collections.ConfigDict()
    d.name = "toy"            # toy | digits | fashion_mnist | cifar10 | imagenet64 | video
    d.toy = "ring8"           # ring8 | grid25 | unbalanced | moons
    d.weights = ()            # mixture weights for toy='unbalanced' (empty: the toy's default)
    d.std = 0.05              # toy mode std
    d.radius = 2.0            # toy ring radius / grid half-width
    d.dim = 2
    d.image_size = 0
    d.num_channels = 0
    d.num_classes = 0         # 0: unconditional
    d.data_dir = ""           # tfds data_dir or IDX folder ('' = the library's default)
    d.random_flip = False

    c.process = p = ml_collections.ConfigDict()
    p.name = "edm"            # vesde | vpsde | subvpsde | edm
    p.sigma_min = 0.002
    p.sigma_max = 80.0
    p.sigma_data = 0.5
    p.P_mean = -1.2
    p.P_std = 1.2
    p.rho = 7.0
    p.beta_min = 0.1
    p.beta_max = 20.0
    p.N = 1000

    c.model = m = ml_collections.ConfigDict()
    m.name = "mlp"            # ddpmpp | ncsnpp | adm | mlp
    m.precond = "edm"         # edm | vp | ve
    m.model_channels = 128
    m.channel_mult = (2, 2, 2)
    m.channel_mult_emb = 4
    m.channel_mult_noise = 1
    m.num_blocks = 4
    m.attn_resolutions = (16,)
    m.dropout = 0.0
    m.embedding_type = "positional"   # positional | fourier
    m.encoder_type = "standard"       # standard | skip | residual
    m.decoder_type = "standard"       # standard | skip
    m.resample_filter = (1, 1)
    m.remat = False                   # U-Nets: recompute block activations in the backward pass
    m.compute_dtype = "float32"       # U-Nets: float32 | bfloat16 (parameters stay float32)
    m.label_dropout = 0.0
    m.hidden = 256
    m.depth = 4

    c.training = t = ml_collections.ConfigDict()
    t.loss = "edm"            # edm | dsm
    t.likelihood_weighting = False
    t.reduce_mean = True
    t.batch_size = 512
    t.num_steps = 2000
    t.log_every = 200
    t.ckpt_every = 1000
    t.keep_checkpoints = 3
    t.ema_rate = 0.999
    t.param_sharding = "replicated"   # replicated | fsdp
    t.preview_every = 1000            # sample grid of the EMA teacher to TensorBoard (0: off)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.warmup = 100
    o.beta1 = 0.9
    o.beta2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.grad_clip = 1.0
    o.decay_steps = 0         # > 0: cosine decay of lr to 0 over that many steps after warm-up

    c.sampling = s = ml_collections.ConfigDict()
    s.sampler = "heun"        # heun | euler_maruyama | pc
    s.num_steps = 18
    s.snr = 0.16
    s.n_corrector = 1
    s.num_samples = 64
    s.batch_size = 64
    s.guidance = 1.0          # CFG: D(x) + w (D(x, c) - D(x)); w = 1 is plain conditional
    # EDM's stochastic sampler (Algorithm 2; heun only): S_churn > 0 raises each sigma in
    # [S_min, S_max] to (1 + gamma) sigma with fresh noise scaled by S_noise before its step,
    # gamma = min(S_churn / num_steps, sqrt(2) - 1). S_churn = 0: the deterministic Heun.
    s.S_churn = 0.0
    s.S_min = 0.0
    s.S_max = float("inf")
    s.S_noise = 1.0

    c.eval = e = ml_collections.ConfigDict()
    e.num_examples = 256      # likelihood: how many test examples
    e.hutchinson = "rademacher"
    e.features = "inception"  # inception | classifier (in-domain fd_<dataset>, CPU scale)
    e.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth or its converted .npz
    e.ref_stats = ""          # reference statistics npz (EDM format); --mode=fid_stats makes one
    e.num_samples = 50_000    # reported protocol; fewer needs monitoring=True (named fid_10k...)
    e.monitoring = False
    e.batch_size = 250
    e.every = 0               # periodic evaluation every N steps during training (0: off)
    e.periodic_num_samples = 10_000
    return c
