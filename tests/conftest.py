"""Shared test fixtures: a small random TinyVLM (fast) and records of the shipped sample."""

import pytest
import torch

import data
import models

TINY = models.TinyConfig(vision_layers=1, layers=2, hidden=32, ffn=64, vision_width=32)


@pytest.fixture(scope="module")
def tiny():
    """A random TinyVLM small enough for many edits per test (seeded; fresh per test module)."""
    torch.manual_seed(0)
    return models.TinyVLM(TINY).eval()


@pytest.fixture(scope="module")
def records():
    return data.load_sample(limit=6)
