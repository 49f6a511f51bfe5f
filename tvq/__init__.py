"""tvq: the vector-quantization machinery of Transformer-VQ, in JAX and Flax."""

from tvq.config import TransformerConfig
from tvq.vq import (
    LearnableVQ,
    VQSpec,
    codebook_from_stats,
    get_codewords,
    get_shortcodes,
    sg,
    st,
)

__all__ = [
    "LearnableVQ",
    "TransformerConfig",
    "VQSpec",
    "codebook_from_stats",
    "get_codewords",
    "get_shortcodes",
    "sg",
    "st",
]
__version__ = "0.1.0"
