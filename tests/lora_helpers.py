"""Fixtures and checks shared by the LoRA test files (imported by them, not a test module)."""

import copy

import pytest
import torch
from conftest import load_parity

from wuerstchen.models.stage_c import StageC

TEXT_CONFIG = dict(hidden_size=24, intermediate_size=64, num_hidden_layers=3, projection_dim=24, vocab_size=49408)


@pytest.fixture(scope="module")
def parity_stage_c():
    meta, weights, _ = load_parity("stage_c")
    model = StageC(**meta["config"])
    model.load_state_dict(weights, strict=True)
    return model.eval(), meta["config"]


@pytest.fixture()
def stage_c(parity_stage_c):
    """A fresh copy per test, so a test that breaks unpatching cannot poison the next one."""
    return copy.deepcopy(parity_stage_c[0])


@pytest.fixture(scope="module")
def parity_text_encoder():
    from wuerstchen.text.encoder import CLIPTextEncoder

    _, weights, _ = load_parity("clip_text")
    return CLIPTextEncoder.from_state_dict(weights, heads=4)


@pytest.fixture()
def text_encoder(parity_text_encoder):
    return copy.deepcopy(parity_text_encoder)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(model, before, except_names=()):
    for name, p in model.named_parameters():
        if name not in except_names:
            assert torch.equal(p.detach(), before[name]), name


def randn(gen, *shape, scale=0.1):
    return torch.randn(*shape, generator=gen) * scale
