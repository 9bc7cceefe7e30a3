"""NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs") in EDM's form.

EDM (Karras et al. 2022) re-implements NCSN++ as its `SongUNet` with the options below, and this
is what EDM (and this project) calls NCSN++: random Fourier noise embedding (scale 16) of width
2 * model_channels (`channel_mult_noise=2`), a residual progressive-input encoder (Score-SDE's
`progressive_input='residual'`), the standard decoder (`progressive='none'`), BigGAN-style up/down
residual blocks, and the FIR resampling filter [1, 3, 3, 1]. Score-SDE's progressive output
(`progressive='output_skip'`) is `decoder_type='skip'`.
"""
from __future__ import annotations

from flax import nnx

from fdistill.models.ddpmpp import SongUNet


class NCSNpp(SongUNet):
    """NCSN++ with EDM's CIFAR-10 settings as defaults (128 channels, mults (2, 2, 2), 4 blocks,
    attention at 16, dropout 0.13, Fourier embedding, residual encoder, standard decoder, FIR
    [1, 3, 3, 1]); any SongUNet keyword argument may be overridden."""

    DEFAULTS = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                    dropout=0.13, embedding_type='fourier', channel_mult_noise=2,
                    encoder_type='residual', decoder_type='standard', resample_filter=(1, 3, 3, 1))

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
                 **kwargs):
        super().__init__(img_resolution, in_channels, out_channels, rngs=rngs, **(self.DEFAULTS | kwargs))
