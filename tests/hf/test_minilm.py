"""LoRA on a real Hugging Face transformer (all-MiniLM-L6-v2, a 6-layer BertModel): exact at
init, bit for bit after save and load, merged within rounding of unmerged, routed per sample as
each adapter alone, and ``"all-linear"`` with HF PEFT's meaning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model

from reference_math import assert_normwise_close


def _perturb(model, seed=0, scale=0.05):
    """Random adapter weights (B starts at zero, so an untrained adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * scale)


def _embed(model, tokens):
    with torch.no_grad():
        return model(**tokens).last_hidden_state


def test_query_value_adapter_is_exact_at_init_and_after_save_and_load(fresh_minilm, tokens, tmp_path):
    base = _embed(fresh_minilm(), tokens)
    model = get_peft_model(fresh_minilm(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert model.get_base_model() is model.base_model
    assert torch.equal(_embed(model, tokens), base)  # B = 0: the base's own ops, bit for bit
    _perturb(model)
    adapted = _embed(model, tokens)
    with pytest.raises(AssertionError, match="exceeds"):  # the adapter moved the output
        assert_normwise_close(adapted, base, rel=1e-3)
    model.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).target_modules == ["query", "value"]
    loaded = PeftModel.from_pretrained(fresh_minilm(), tmp_path)
    assert torch.equal(_embed(loaded, tokens), adapted)


def test_merged_model_matches_the_unmerged_one(fresh_minilm, tokens):
    model = get_peft_model(fresh_minilm(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _perturb(model, seed=1)
    unmerged = _embed(model, tokens)
    merged = _embed(model.merge_and_unload(), tokens)
    # layer norm and softmax are not polynomial: a normwise bound. Merging rounds W + s·B·A once
    # per weight (2^-24 relative); 6 layers of float32 GEMMs over 384 wide keep the difference
    # near 1e-6 of max|y|; 2^-12 leaves a wide margin while a missing adapter (relative ~1e-1) fails.
    assert_normwise_close(merged, unmerged, rel=2.0**-12, name="merged")
    assert all(not hasattr(m, "lora_A") for m in model.base_model.modules())


def test_routed_batch_matches_each_adapter_alone(fresh_minilm, tokens):
    model = get_peft_model(fresh_minilm(), LoraConfig(r=4, target_modules=["query", "value"]), "DE")
    model.add_adapter("FR", LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "dense"]))
    _perturb(model, seed=2)  # inference_mode is off: both adapters are trainable, both perturbed
    ids = torch.tensor([0, 1, -1, 1])
    with torch.no_grad():
        routed = model(**tokens, adapter_ids=ids).last_hidden_state
    for position, adapter in enumerate(ids.tolist()):
        if adapter < 0:
            with model.disable_adapter():
                alone = _embed(model, tokens)
        else:
            model.set_adapter(model.adapter_names[adapter])
            alone = _embed(model, tokens)
        # the same ops on the same rows, grouped differently: float32 rounding only
        assert_normwise_close(routed[position], alone[position], rel=2.0**-14, name=f"sample {position}")


def test_all_linear_adapts_every_linear_but_the_output_head(fresh_minilm, minilm_path):
    encoder = fresh_minilm()
    linears = sorted(n for n, m in encoder.named_modules() if isinstance(m, nn.Linear))
    model = get_peft_model(encoder, LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(model.adapter_holders()) == linears  # 6 layers × 6 Linear + the pooler: 37
    assert len(linears) == 37

    transformers = pytest.importorskip("transformers")
    with_head = transformers.BertForMaskedLM(transformers.AutoConfig.from_pretrained(minilm_path))
    head = next(n for n, m in with_head.named_modules() if m is with_head.get_output_embeddings())
    adapted = get_peft_model(with_head, LoraConfig(r=2, target_modules="all-linear"))
    assert head not in adapted.adapter_holders()
    assert "cls.predictions.transform.dense" in adapted.adapter_holders()


@pytest.mark.parametrize("pattern", [None, "layer"])
def test_layers_to_transform_keeps_the_targets_of_the_listed_layers(fresh_minilm, tokens, tmp_path, pattern):
    config = LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[0, 5], layers_pattern=pattern)
    model = get_peft_model(fresh_minilm(), config)
    expected = [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 5) for m in ("query", "value")]
    assert sorted(model.adapter_holders()) == sorted(expected)
    _perturb(model, seed=5)
    model.save_pretrained(tmp_path)
    saved = LoraConfig.from_pretrained(tmp_path)
    assert saved.layers_to_transform == [0, 5] and saved.layers_pattern == ([pattern] if pattern else None)
    assert torch.equal(_embed(PeftModel.from_pretrained(fresh_minilm(), tmp_path), tokens), _embed(model, tokens))
    hf_peft = pytest.importorskip("peft", reason="peft (HF PEFT) is not installed")
    theirs = hf_peft.PeftModel.from_pretrained(fresh_minilm(), tmp_path)  # and into HF PEFT, same outputs
    assert torch.equal(_embed(theirs, tokens), _embed(model, tokens))


def test_layers_to_transform_that_keeps_nothing_names_the_layers(fresh_minilm):
    with pytest.raises(ValueError, match=r"layers_to_transform \[9\] kept none .* are \[0, 1, 2, 3, 4, 5\]"):
        get_peft_model(fresh_minilm(), LoraConfig(r=2, target_modules=["query"], layers_to_transform=9))
