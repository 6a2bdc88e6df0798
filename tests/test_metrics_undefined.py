"""``undefined_auc_reason`` says why ``auc`` is NaN; ``auc`` itself keeps returning NaN."""

import math

import pytest
import torch

from recpeft.metrics import auc, undefined_auc_reason


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_one_label_only(value):
    labels = torch.full((7,), value)
    assert math.isnan(auc(torch.randn(7), labels))
    assert undefined_auc_reason(labels) == f"the rows hold only one label (all 7 are {int(value)})"


def test_no_rows():
    assert math.isnan(auc(torch.zeros(0), torch.zeros(0)))
    assert undefined_auc_reason(torch.zeros(0)) == "there are no rows"


def test_reason_is_none_exactly_when_auc_is_defined():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8):
        for _ in range(20):
            labels = (torch.rand(n, generator=generator) < 0.5).double()
            defined = not math.isnan(auc(torch.randn(n, generator=generator), labels))
            assert (undefined_auc_reason(labels) is None) == defined
            assert defined == (0 < int(labels.sum()) < n)


def test_labels_are_checked():
    with pytest.raises(ValueError, match="labels holds non-finite values"):
        undefined_auc_reason(torch.tensor([0.0, float("nan")]))
