"""LoraAdamW: dense gradients follow torch.optim.AdamW exactly; sparse gradients update the
touched rows as AdamW would and leave the rest alone."""

import torch

from recpeft import LoraAdamW

from reference_math import assert_within_bound

# One AdamW step, elementwise: decay p·(1 − lr·λ) (2 roundings), m and v updates (3 and 4), two bias
# corrections (4), √, + ε, ÷, ·lr, − (5): ≤ 20 roundings, each relative to its operands' magnitude;
# the decay factor is ≤ 1, so step errors add up and do not grow (reference_math.assert_within_bound).
ADAM_ROUNDINGS = 20


def _adam_bound(start, lr, weight_decay, steps, betas=(0.9, 0.999)):
    """|p| plus every step's |lr·m̂/(√v̂ + ε)| ≤ lr·max(1, (1 − β1)/√(1 − β2)) (Kingma and Ba, §2.1),
    the same for the m̂ and v̂ sums of absolute values, which the roundings are relative to."""
    k = max(1.0, (1 - betas[0]) / (1 - betas[1]) ** 0.5)
    return start.abs() * (1 + lr * weight_decay) + steps * lr * k


def test_dense_matches_torch_adamw():
    torch.manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.float64)
    p1 = torch.nn.Parameter(start.clone())
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = LoraAdamW([p1], lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW([p2], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(5, 3, dtype=torch.float64)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        ours.step(), theirs.step()
    assert_within_bound(p1, p2, _adam_bound(start, 0.01, 0.1, 4), ADAM_ROUNDINGS * 4, torch.float64, name="p")


def test_sparse_updates_touched_rows_like_dense_adamw():
    torch.manual_seed(1)
    start = torch.randn(6, 2, dtype=torch.float64)
    sparse_p = torch.nn.Parameter(start.clone())
    dense_rows = torch.nn.Parameter(start[[1, 4]].clone())
    ours = LoraAdamW([sparse_p], lr=0.05, weight_decay=0.2)
    reference = torch.optim.AdamW([dense_rows], lr=0.05, weight_decay=0.2)
    for _ in range(3):
        values = torch.randn(3, 2, dtype=torch.float64)  # row 4 appears twice: gradients add up
        sparse_p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 4]]), values, (6, 2), check_invariants=True)
        dense_rows.grad = torch.stack([values[0], values[1] + values[2]])
        ours.step(), reference.step()
    bound = _adam_bound(start[[1, 4]], 0.05, 0.2, 3)
    assert_within_bound(sparse_p[[1, 4]], dense_rows, bound, ADAM_ROUNDINGS * 3 + 1, torch.float64, name="rows")
    untouched = [0, 2, 3, 5]
    assert torch.equal(sparse_p[untouched], start[untouched])
