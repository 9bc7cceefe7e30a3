"""Writes tests/golden/*.npz: pytorch-fid's outputs that the torch-free tests compare against.

Needs torch, torchvision and pytorch-fid (0.3.0) next to jax/flax, e.g. in a separate venv:

    pip install torch==2.14.1 torchvision==0.29.1 && pip install pytorch-fid==0.3.0 --no-deps
    PYTHONPATH=. python experiments/make_inception_golden.py

1. ``inception_parity.npz``: pytorch-fid's FID InceptionV3 (its weight download replaced by
   ``inception.random_state_dict(SEED)``, which numpy regenerates bit for bit, so no weights are
   committed) on seeded uint8 images at 32x32, 64x64 and a 304x336 downscale: the 2048-d pool
   features and the unbiased logits ``pool @ fc.weight.T``; and pytorch-fid's state-dict key
   names and shapes (JSON), which the port's own table must equal.
2. ``frechet_golden.npz``: pytorch-fid's ``calculate_frechet_distance`` on random statistics,
   well conditioned and rank-deficient (near-singular) ones.
"""
from __future__ import annotations

import argparse
import json
import os
import unittest.mock

import numpy as np

SEED = 0
IMAGE_SHAPES = {"32": (2, 32, 32, 3), "64": (2, 64, 64, 3), "304x336": (2, 304, 336, 3)}


def parity_images(seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    return {k: rng.integers(0, 256, size=s, dtype=np.uint8) for k, s in IMAGE_SHAPES.items()}


def torch_fid_features(state_dict: dict[str, np.ndarray], images: np.ndarray):
    """pytorch-fid's FID InceptionV3 with the given weights: (pool [N, 2048], logits [N, 1008])."""
    import torch
    from pytorch_fid import inception as pfi

    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    with unittest.mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: tensors):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        pool = model(x)[0][:, :, 0, 0]
        logits = torch.nn.functional.linear(pool, tensors["fc.weight"])
    return pool.numpy(), logits.numpy()


def torch_state_dict_shapes(state_dict: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Key -> shape of pytorch-fid's ``fid_inception_v3()`` state dict (float tensors only)."""
    import torch
    from pytorch_fid import inception as pfi

    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    with unittest.mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: tensors):
        model = pfi.fid_inception_v3()
    return {k: list(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def frechet_cases(seed: int = SEED) -> dict[str, np.ndarray]:
    """Random (mu, sigma) pairs: full rank d=16, rank 6 of d=32 (singular), equal inputs, and a
    product sigma1 @ sigma2 = [[0, 1], [0, 0]] with no square root (pytorch-fid's eps branch)."""
    rng = np.random.Generator(np.random.PCG64(seed + 2))
    cases = {}
    for name, d, rank in (("full", 16, 40), ("singular", 32, 6)):
        for i in (1, 2):
            a = rng.standard_normal((d, rank))
            cases[f"{name}_mu{i}"] = rng.standard_normal(d)
            cases[f"{name}_sigma{i}"] = a @ a.T / rank
    cases["equal_mu1"] = cases["equal_mu2"] = cases["full_mu1"]
    cases["equal_sigma1"] = cases["equal_sigma2"] = cases["full_sigma1"]
    cases["nilpotent_mu1"], cases["nilpotent_mu2"] = np.zeros(2), np.ones(2)
    cases["nilpotent_sigma1"], cases["nilpotent_sigma2"] = np.array([[0., 1.], [0., 0.]]), np.eye(2)
    return cases


def main() -> None:
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance

    from fdistill.evaluation import inception

    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "..",
                                                           "tests", "golden"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(SEED)

    state_dict = inception.random_state_dict(SEED)
    out = {"seed": np.array(SEED),
           "torch_state_dict_shapes": np.array(json.dumps(torch_state_dict_shapes(state_dict)))}
    for key, images in parity_images().items():
        pool, logits = torch_fid_features(state_dict, images)
        out[f"images_{key}"] = images
        out[f"pool_{key}"] = pool
        out[f"logits_{key}"] = logits
        print(f"{key}: pool mean {pool.mean():.4f} std {pool.std():.4f}; "
              f"logits std {logits.std():.4f}")
    np.savez_compressed(os.path.join(args.out_dir, "inception_parity.npz"), **out)

    cases = frechet_cases()
    for name in ("full", "singular", "equal", "nilpotent"):
        fd = calculate_frechet_distance(cases[f"{name}_mu1"], cases[f"{name}_sigma1"],
                                        cases[f"{name}_mu2"], cases[f"{name}_sigma2"])
        cases[f"{name}_fd"] = np.array(fd)
        print(f"frechet {name}: {fd!r}")
    np.savez_compressed(os.path.join(args.out_dir, "frechet_golden.npz"), **cases)
    print(f"wrote {args.out_dir}/inception_parity.npz and frechet_golden.npz "
          f"(torch {torch.__version__})")


if __name__ == "__main__":
    main()
