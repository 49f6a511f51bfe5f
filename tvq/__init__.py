"""tvq: the vector-quantization machinery of Transformer-VQ, in JAX and Flax."""

from tvq.attention import (
    attend_block,
    blockwise_attention,
    initial_attention_state,
    update_state,
    vq_attention,
    vq_attention_flops,
)
from tvq.config import TransformerConfig
from tvq.layers import GAU, LayerNorm
from tvq.model import Transformer, TransformerLayer, loss_fn
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
    "GAU",
    "LayerNorm",
    "LearnableVQ",
    "Transformer",
    "TransformerLayer",
    "attend_block",
    "blockwise_attention",
    "initial_attention_state",
    "loss_fn",
    "update_state",
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
