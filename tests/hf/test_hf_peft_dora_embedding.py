"""DoRA on nn.Embedding moves both ways between recpeft and HF PEFT with the same outputs, on the
tiny recommender (its ``item`` table with DoRA, beside a DoRA Linear ``mlp.0``).

HF PEFT → recpeft: HF PEFT's own file (``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r],
``lora_magnitude_vector`` [D]) loads with ``PeftModel.from_pretrained``. recpeft → HF PEFT:
recpeft's file keeps the table's touched rows (``peft_type`` RECPEFT_LORA, which HF PEFT refuses),
so its embedding tensors go through ``LoraEmbedding.hf_peft_tensors`` into HF PEFT's keys, the
rest as it is. Each library computes the column norms and scales in its own order: within float32
rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import LoraEmbedding
from recpeft.peft.serialization import read_adapter_file

from conv_models import perturb_trainable
from reference_math import assert_normwise_close
from toy_models import NUM_ITEMS, make_batch, make_model

NO_PEFT = "peft (HF PEFT) is not installed: pip install peft"
TARGETS = ["item", "mlp.0"]
PREFIX = "base_model.model.item."
# Two DoRA layers' norms (over V = 60 rows, K = 24 inputs), scales and products in float32, in
# two orders: a few 60·2^-24 ≈ 4e-6 of the logits' scale. 2^-14 leaves a wide margin; an adapter
# without its magnitude (m moved 30% off its start) or with A transposed is O(10^-1) off.
REL = 2.0**-14


@torch.no_grad()
def _logits(model):
    return model(*make_batch())


@torch.no_grad()
def _touch_some_rows(model):
    """recpeft's A [V, r] of the item table holds a handful of rows, as after a few batches: its
    file is sparse."""
    a = model.lora_layers()["item"].lora_A["default"]
    rows = torch.tensor([1, 7, 8, 30, 59])
    a.zero_()[rows] = torch.randn(rows.numel(), a.shape[1], generator=torch.Generator().manual_seed(9))


def test_an_hf_peft_dora_embedding_adapter_loads_into_recpeft_with_the_same_outputs(tmp_path):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    theirs = hf_peft.get_peft_model(
        make_model(), hf_peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True)
    )
    perturb_trainable(theirs, seed=4)
    expected = _logits(theirs)
    assert not torch.allclose(expected, _logits(make_model()), atol=1e-3)  # the adapter matters
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model(), tmp_path)
    assert ours.lora_layers()["item"].is_dora("default")
    assert_normwise_close(_logits(ours), expected, rel=REL, name="logits")


def test_a_recpeft_dora_embedding_adapter_loads_into_hf_peft_with_the_same_outputs(tmp_path):
    hf_peft = pytest.importorskip("peft", reason=NO_PEFT)
    ours = get_peft_model(make_model(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True))
    perturb_trainable(ours, seed=3)
    _touch_some_rows(ours)
    expected = _logits(ours)
    ours.save_pretrained(tmp_path / "recpeft")
    tensors = read_adapter_file(tmp_path / "recpeft")
    assert PREFIX + "lora_embedding_A.indices" in tensors  # recpeft's sparse form
    table = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    hf_tensors = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    hf_tensors.update({PREFIX + k: v for k, v in LoraEmbedding.hf_peft_tensors(table).items()})
    assert hf_tensors[PREFIX + "lora_embedding_A"].shape == (2, NUM_ITEMS)
    assert hf_tensors[PREFIX + "lora_magnitude_vector"].shape == (8,)
    out = tmp_path / "hf"
    out.mkdir()
    save_file(hf_tensors, out / "adapter_model.safetensors", {"format": "pt"})
    config = json.loads((tmp_path / "recpeft" / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    theirs = hf_peft.PeftModel.from_pretrained(make_model(), out)
    assert_normwise_close(_logits(theirs), expected, rel=REL, name="logits")
    # and back: HF PEFT's file of the same adapter gives recpeft the same outputs
    theirs.save_pretrained(tmp_path / "again")
    assert_normwise_close(_logits(PeftModel.from_pretrained(make_model(), tmp_path / "again")), expected, rel=REL)
