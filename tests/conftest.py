"""Shared test setup: hypothesis profiles and the device parametrization."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import tinysd

# CI: bounded, reproducible examples and no deadline (a 2-core runner is slow and noisy).
settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not tinysd.cuda.is_available(), reason="CuPy or a GPU is absent")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    tinysd.manual_seed(0)
    np.random.seed(0)
