"""Shared test setup: MindSpore PyNative mode on CPU, fixed seeds."""
import random

import numpy as np
import pytest

import mindspore as ms

ms.set_device("CPU")
ms.set_context(mode=ms.PYNATIVE_MODE)
# Synchronous op launch: on this 2-core CPU the asynchronous PyNative pipeline is ~10x slower (thread hand-offs).
ms.runtime.launch_blocking()


@pytest.fixture(autouse=True)
def _seeds_and_pynative():
    """Every test starts in PyNative mode with fixed numpy / python / mindspore seeds."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    random.seed(0)
    np.random.seed(0)
    ms.set_seed(0)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
