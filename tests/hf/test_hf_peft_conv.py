"""Conv1d / Conv2d adapter files move both ways between recpeft and HF PEFT with the same outputs,
plain LoRA and DoRA (``lora_magnitude_vector`` [1, O, 1…]), on a tiny CNN (a strided Conv2d stem,
a padded Conv1d; the Linear head stays frozen). Plain LoRA runs the same convolutions in both
libraries: the outputs are bit-identical. DoRA computes norms and scales in another order in each: within
float32 rounding."""

from __future__ import annotations

import json

import pytest
import torch

from recpeft import LoraConfig, PeftModel, get_peft_model

from conv_models import CONV_TARGETS, make_cnn, make_images, perturb_trainable
from reference_math import assert_normwise_close

NO_PEFT = "peft (HF PEFT) is not installed: pip install peft"
CASES = {"plain": {}, "DoRA": {"use_dora": True}}


def _assert_same(got, expected, extra):
    if extra.get("use_dora"):
        # Two conv layers' norms (over I·Πk ≤ 54 squares), scales and convolutions of length
        # ≤ 54 in float32, in two orders: a few 54·2^-24 ≈ 3e-6 of the output's scale. 2^-14 leaves
        # a wide margin; a missing or misshapen magnitude (m moved 30% off its start) is O(10^-1) off.
        assert_normwise_close(got, expected, rel=2.0**-14, name="output")
    else:
        assert torch.equal(got, expected)


@torch.no_grad()
def _outputs(model):
    return model(make_images())


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_a_recpeft_conv_adapter_loads_into_hf_peft_with_the_same_outputs(tmp_path, extra):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    ours = get_peft_model(make_cnn(), LoraConfig(r=2, lora_alpha=6, target_modules=CONV_TARGETS, **extra))
    perturb_trainable(ours, seed=3)
    expected = _outputs(ours)
    assert not torch.allclose(expected, _outputs(make_cnn()), atol=1e-3)  # the adapter matters
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = hf_peft.PeftModel.from_pretrained(make_cnn(), tmp_path)
    _assert_same(_outputs(theirs), expected, extra)


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_an_hf_peft_conv_adapter_loads_into_recpeft_with_the_same_outputs(tmp_path, extra):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    theirs = hf_peft.get_peft_model(
        make_cnn(), hf_peft.LoraConfig(r=2, lora_alpha=6, target_modules=CONV_TARGETS, **extra)
    )
    perturb_trainable(theirs, seed=4)
    expected = _outputs(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_cnn(), tmp_path)
    assert ours.peft_config["default"].use_dora == bool(extra)
    _assert_same(_outputs(ours), expected, extra)
