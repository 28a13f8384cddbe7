"""Suite-wide setup, run before any test module is imported.

On machines without CUDA the Triton kernels run through Triton's interpreter; the flag must be
set before triton is first imported (transformers imports it early), so it is set here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
