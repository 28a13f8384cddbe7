"""seerattn: learned block-sparse attention (SeerAttention) for Hugging Face LLMs.

``import seerattn`` imports neither triton nor transformers; the Hugging Face integration lives in
:mod:`seerattn.hf` and the Triton kernels in :mod:`seerattn.ops._triton`, both imported on use.
"""

from .block_mask import BlockMask, SparsityPolicy, mask_from_scores
from .ops import attention_with_block_scores, block_sparse_attention

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "SparsityPolicy",
    "__version__",
    "attention_with_block_scores",
    "block_sparse_attention",
    "mask_from_scores",
]
