"""tvq: the vector-quantization machinery of Transformer-VQ, in JAX and Flax."""

from tvq.attention import vq_attention, vq_attention_flops
from tvq.config import TransformerConfig
from tvq.parallel import (
    apply_sgd1,
    codebook_grads,
    make_data_mesh,
    make_vq_spec,
    pmap_codebook_grads,
    shard_map_codebook_grads,
    sharded_codebook_grads,
)
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
    "apply_sgd1",
    "codebook_grads",
    "make_data_mesh",
    "make_vq_spec",
    "pmap_codebook_grads",
    "shard_map_codebook_grads",
    "sharded_codebook_grads",
    "TransformerConfig",
    "VQSpec",
    "codebook_from_stats",
    "get_codewords",
    "get_shortcodes",
    "sg",
    "st",
    "vq_attention",
    "vq_attention_flops",
]
__version__ = "0.1.0"
