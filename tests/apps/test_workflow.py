"""make_trainable / trainable_copy: the one way the dense and LoRA arms of a comparison are made."""

import pytest
import torch
from torch import nn

from recpeft.apps.workflow import Method, make_trainable, trainable_copy
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import PeftModel

LORA = LoraConfig(r=2, target_modules=["0"])


def _partly_frozen() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    model[2].requires_grad_(False)
    return model


def test_dense_makes_every_parameter_trainable_in_place():
    model = _partly_frozen()
    assert make_trainable(model, Method.DENSE) is model
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training  # the mode is the caller's


def test_lora_wraps_and_freezes_the_base():
    model = make_trainable(_partly_frozen(), "lora", LORA)
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="needs a lora_config"):
        make_trainable(_partly_frozen(), Method.LORA)
    with pytest.raises(ValueError):
        make_trainable(_partly_frozen(), "sgd")


def test_trainable_copy_leaves_the_base_alone():
    base = _partly_frozen()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    dense, lora = trainable_copy(base, Method.DENSE), trainable_copy(base, Method.LORA, LORA)
    assert not base[2].weight.requires_grad and base[0].weight.requires_grad
    assert isinstance(base[0], nn.Linear)  # not replaced by a LoRA layer
    for name, parameter in base.named_parameters():
        assert dense.get_parameter(name) is not parameter
        assert torch.equal(parameter, before[name])
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(dense(x), base(x)) and torch.equal(lora(x), base(x))
