"""Optional torch.compile with an eager fallback (VTFUSION_COMPILE=1), for inference loads."""

from __future__ import annotations

import pytest
import torch

from vtfusion.models import factory
from vtfusion.models.accel import CompiledOrEager


@pytest.fixture
def saved(tmp_path, bundle):
    factory.save(bundle, tmp_path / "m")
    return tmp_path / "m"


def test_not_compiled_unless_asked(saved, monkeypatch):
    monkeypatch.delenv("VTFUSION_COMPILE", raising=False)
    assert not isinstance(factory.load(saved).model.vision, CompiledOrEager)


def test_compile_failure_falls_back_to_eager_once(saved, monkeypatch, caplog):
    monkeypatch.setenv("VTFUSION_COMPILE", "1")
    b = factory.load(saved)
    assert isinstance(b.model.vision, CompiledOrEager)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("inductor exploded")

    object.__setattr__(b.model.vision, "_compiled", broken)
    s = b.config.vision.image_size
    px = torch.randn(2, 3, s, s)
    with torch.no_grad():
        got = b.model.encode_image(px)
        again = b.model.encode_image(px)
        want = b.model.image_emb(b.model.vision.eager(px))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    assert calls == [1]  # tried once, then eager for good
    assert "torch.compile failed" in caplog.text


@pytest.mark.slow
def test_compiled_equals_eager(saved, monkeypatch):
    monkeypatch.setenv("VTFUSION_COMPILE", "1")
    b = factory.load(saved)
    s = b.config.vision.image_size
    px = torch.randn(3, 3, s, s)
    with torch.no_grad():
        torch.testing.assert_close(b.model.encode_image(px), b.model.image_emb(b.model.vision.eager(px)), atol=1e-5, rtol=1e-4)
    assert not b.model.vision._failed
