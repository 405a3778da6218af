"""Backbone cache: timm's weight initialisation of the large models dominates the test time, so each
registered backbone is built once per session (about 2.5 GB for all of them) and handed out either
shared or as a deep copy."""

from __future__ import annotations

import copy

import pytest

import hmn.networks.hybrid as hybrid
from hmn.networks.backbones import build_backbone

IMG = 64  # small inputs: every backbone reaches stride 32 with a 2x2 map


@pytest.fixture(scope="session")
def backbone_cache():
    cache: dict = {}

    def cached(name, in_channels=1, img_size=IMG, pretrained=False, share=False, options=None):
        if pretrained is not False or options:
            return build_backbone(name, in_channels=in_channels, img_size=img_size, pretrained=pretrained, options=options)
        key = (name, in_channels, img_size if isinstance(img_size, int) else tuple(img_size))
        if key not in cache:
            cache[key] = build_backbone(name, in_channels=in_channels, img_size=img_size)
        return cache[key] if share else copy.deepcopy(cache[key])

    return cached


@pytest.fixture
def cached_backbones(backbone_cache, monkeypatch):
    """Makes HybridMedNet take a private copy of its backbone from the session cache."""
    monkeypatch.setattr(hybrid, "build_backbone", backbone_cache)
    return backbone_cache


@pytest.fixture
def shared_backbones(backbone_cache, monkeypatch):
    """Makes HybridMedNet take the session cache's backbone itself: for forward passes that change no weights."""
    monkeypatch.setattr(hybrid, "build_backbone", lambda *a, **k: backbone_cache(*a, share=True, **k))
    return backbone_cache
