"""Device "auto": CUDA, else Apple's MPS, else the CPU, said in one log line; the machine's CPU features."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.errors import ExplorerError
from engine.runtime import models


@pytest.mark.parametrize(("cuda", "mps", "expected", "said"), [
    (True, True, "cuda", "Device auto: cuda (Test GPU; 2 GPU(s) visible"),
    (False, True, "mps", "Device auto: mps (Apple silicon GPU; no CUDA GPU found)"),
    (False, False, "cpu", "Device auto: cpu ("),
])
def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch, caplog, cuda, mps, expected, said) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Test GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="engine.runtime.models"):
        device = models.resolve_device("auto")
    assert device == torch.device(expected)
    assert [record.getMessage() for record in caplog.records if record.getMessage().startswith(said)]
    assert models.describe_machine().device == expected


def test_a_named_device_is_taken_as_named_and_a_wrong_one_is_one_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ExplorerError, match="Unknown device 'gpu'"):
        models.resolve_device("gpu")


def test_load_model_places_the_model_where_auto_says(tiny_model_dir, monkeypatch) -> None:
    asked: list[object] = []
    monkeypatch.setattr(models, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    model = models.load_model(str(tiny_model_dir))
    assert asked == ["auto"] and model.device == torch.device("cpu")


@pytest.mark.parametrize(("avx2", "bf16", "amx", "kind"), [
    (True, False, False, "AVX2 CPU"), (True, True, False, "AVX512-BF16 CPU"), (True, True, True, "AMX CPU"),
])
def test_machine_kind_follows_the_cpu_features(avx2, bf16, amx, kind) -> None:
    machine = models.Machine(cpu="x", cores=2, avx2=avx2, avx512_bf16=bf16, amx=amx, device="cpu")
    assert machine.kind == kind
    assert machine.features == f"AVX2 {'yes' if avx2 else 'no'}, AVX512-BF16 {'yes' if bf16 else 'no'}, " \
                               f"AMX {'yes' if amx else 'no'}"
    assert models.Machine(cpu="x", cores=8, avx2=True, avx512_bf16=False, amx=False, device="mps").kind == \
        "Apple silicon (MPS)"
