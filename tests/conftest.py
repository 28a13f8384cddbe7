"""Suite-wide setup, run before any test module is imported.

On machines without CUDA the Triton kernels run through Triton's interpreter; the flag must be
set before triton is first imported (transformers imports it early), so it is set here, together
with the interpreter work-around every module that runs a kernel needs
(:func:`seerattn.ops._triton.config.patch_interpreter_index`, which that module also applies when it is imported
under the interpreter).
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and importlib.util.find_spec("triton") is not None:
    from seerattn.ops._triton.config import patch_interpreter_index

    patch_interpreter_index()


def _single_thread():
    """Tiny matrices: one intra-op thread is faster than two (and much faster on a loaded CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; ``one_thread_module`` also
# covers the module's own module-scoped fixtures (models built once per module).
one_thread = pytest.fixture(_single_thread, name="one_thread")
one_thread_module = pytest.fixture(_single_thread, scope="module", name="one_thread_module")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A saved tiny Llama + tokenizer + JSONL corpus (``hf_models.make_tiny``), built once for the trainers' tests
    (distillation, fine-tuning, the chunked loss, torchrun); tests write their runs elsewhere."""
    from hf_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))
