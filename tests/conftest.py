"""Test settings: Triton kernels run under the interpreter on CPU machines (set before any
import of triton), deterministic seeds, a hypothesis profile sized for 2 cores."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "recpeft", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "recpeft"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
