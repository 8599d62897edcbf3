import os

import pytest
import torch

from rcdm.device import default_workers, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == auto and resolve_device("") == auto
    with pytest.raises(ValueError, match="unknown device 'tpu7'"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:1")  # never a silent fall-back to the CPU


def test_default_workers_never_exceed_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers() == 2 and default_workers(cap=1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 4
