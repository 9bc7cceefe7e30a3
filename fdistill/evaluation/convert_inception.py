"""Converts pytorch-fid's FID Inception weights (.pth) to an .npz read without torch.

    python -m fdistill.evaluation.convert_inception \
        --pth=pt_inception-2015-12-05-6726825d.pth --out=inception-2015-12-05.npz

The .npz keeps pytorch-fid's key names and layouts (every name and shape is checked here and
again on load; the layout change to Flax happens in ``inception.model_from_state_dict``), plus
``__source_sha256__``, the sha256 of the .pth, which evaluation records as the weights' identity.
Get the .pth from https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def convert(pth: str, out: str) -> str:
    """Reads, checks and writes; returns the source file's sha256."""
    from fdistill.evaluation import inception
    arrays = inception.check_state_dict(inception.read_state_dict(pth), source=pth)
    sha = inception.file_sha256(pth)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, __source_sha256__=np.array(sha), **arrays)
    return sha


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pth", required=True, help="pytorch-fid's pt_inception-2015-12-05-*.pth")
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        parser.error(f"--out must end in .npz, got {args.out!r}")
    sha = convert(args.pth, args.out)
    print(f"wrote {args.out} (source sha256 {sha})")


if __name__ == "__main__":
    main()
