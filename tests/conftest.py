"""Test setup: Triton interpreter wiring, hypothesis profiles, seeding, the ``gpu`` marker.

Without CUDA the Triton kernels run on CPU tensors in the Triton interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when the module that defines it is imported,
so it is set here, before any test module (or slothc) imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from slothc.testing import register_profiles  # noqa: E402

HYPOTHESIS_PROFILE = register_profiles()


def pytest_report_header(config):
    return (
        f"slothc: hypothesis profile {HYPOTHESIS_PROFILE!r}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, cuda={torch.cuda.is_available()}"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state (hypothesis examples draw their own seeds)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
