"""Adapter files move both ways between recpeft and HF PEFT with the same outputs: plain LoRA,
``bias="lora_only"`` (the bias of a wrapped module in its ``base_layer``), ``modules_to_save``
(the saved copy under the module's own name) and DoRA (``lora_magnitude_vector``) — HF PEFT's key
layout, on MiniLM's real weights. Plain layouts give bit-identical outputs (the same ops); DoRA is
computed in another order by each library (norms, scales), so within float32 rounding."""

from __future__ import annotations

import json

import pytest
import torch

from recpeft import LoraConfig, PeftModel, get_peft_model

from reference_math import assert_normwise_close
from toy_models import ALL_TARGETS, make_model

CASES = {
    "plain": {},
    "bias lora_only": {"bias": "lora_only"},
    "modules_to_save": {"modules_to_save": ["pooler.dense"]},
    "DoRA": {"use_dora": True},
}
TARGETS = ["query", "value"]
NO_PEFT = "peft (HF PEFT) is not installed: pip install peft"


def _perturb_trainable(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def _assert_same(got, expected, extra):
    if extra.get("use_dora"):
        # 6 layers of norms, scales and GEMMs in float32, in two orders; the pooler's tanh keeps
        # |y| ≤ 1. Measured ≤ 1e-6; 2^-14 leaves a wide margin, a missing magnitude fails (O(10^-2))
        assert_normwise_close(got, expected, rel=2.0**-14, name="pooled")
    else:
        assert torch.equal(got, expected)  # the same weights through the same ops


def _pooled(model, tokens):
    with torch.no_grad():
        return model(**tokens).pooler_output


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_a_recpeft_adapter_loads_into_hf_peft_with_the_same_outputs(fresh_minilm, tokens, tmp_path, extra):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    ours = get_peft_model(fresh_minilm(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **extra))
    _perturb_trainable(ours, seed=3)
    expected = _pooled(ours, tokens)
    assert not torch.allclose(expected, _pooled(fresh_minilm(), tokens), atol=1e-3)  # the adapter matters
    ours.save_pretrained(tmp_path)
    theirs = hf_peft.PeftModel.from_pretrained(fresh_minilm(), tmp_path)
    _assert_same(_pooled(theirs, tokens), expected, extra)


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_an_hf_peft_adapter_loads_into_recpeft_with_the_same_outputs(fresh_minilm, tokens, tmp_path, extra):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    theirs = hf_peft.get_peft_model(
        fresh_minilm(), hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **extra)
    )
    _perturb_trainable(theirs, seed=4)
    expected = _pooled(theirs, tokens)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh_minilm(), tmp_path)
    _assert_same(_pooled(ours, tokens), expected, extra)


def test_embedding_adapters_are_marked_as_recpeft_files_that_hf_peft_refuses(tmp_path):
    """HF PEFT has no embedding-bag layer (and keys embeddings otherwise): a file with recpeft's
    own layers says so in peft_type, so HF PEFT refuses it instead of running un-adapted."""
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    linear_only, with_tables = tmp_path / "linear", tmp_path / "tables"
    get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0", "mlp.2"])).save_pretrained(linear_only)
    get_peft_model(make_model(), LoraConfig(r=2, target_modules=ALL_TARGETS)).save_pretrained(with_tables)
    assert json.loads((linear_only / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((with_tables / "adapter_config.json").read_text())["peft_type"] == "RECPEFT_LORA"
    loaded = hf_peft.PeftModel.from_pretrained(make_model(), linear_only)  # HF PEFT takes the Linear one
    assert any(n.endswith("mlp.0") and hasattr(m, "lora_A") for n, m in loaded.named_modules())
    with pytest.raises((KeyError, ValueError), match="RECPEFT_LORA"):
        hf_peft.PeftModel.from_pretrained(make_model(), with_tables)
    ours = PeftModel.from_pretrained(make_model(), with_tables)  # and recpeft reads its own format
    assert sorted(ours.adapter_holders()) == sorted(ALL_TARGETS)
