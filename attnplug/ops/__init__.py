"""Reference ops in plain PyTorch (DESIGN §8), with float64-exact naive forms for tests.

Every backend's kernels compute the same functions as these, whatever the dtype. They run on any
float dtype, on CPU and CUDA, and are differentiable (except the integer top-k indices).
"""

from attnplug.ops.attention import (
    causal_attention,
    causal_attention_probs,
    causal_mask,
    naive_causal_attention,
)
from attnplug.ops.causal_conv1d import causal_conv1d, naive_causal_conv1d
from attnplug.ops.dsa import (
    dsa_indexer_kl_loss,
    dsa_indexer_loss,
    dsa_indexer_topk,
    indexer_scores,
    naive_dsa_indexer_topk,
    naive_sparse_attention,
    sparse_attention,
)
from attnplug.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    naive_recurrent_gated_delta_rule,
)

__all__ = [
    "causal_attention",
    "causal_attention_probs",
    "causal_conv1d",
    "causal_mask",
    "chunk_gated_delta_rule",
    "dsa_indexer_kl_loss",
    "dsa_indexer_loss",
    "dsa_indexer_topk",
    "gated_delta_rule_step",
    "indexer_scores",
    "naive_causal_attention",
    "naive_causal_conv1d",
    "naive_dsa_indexer_topk",
    "naive_recurrent_gated_delta_rule",
    "naive_sparse_attention",
    "sparse_attention",
]
