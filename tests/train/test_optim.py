"""LoraAdamW: dense gradients follow torch.optim.AdamW exactly; sparse gradients update the
touched rows as AdamW would and leave the rest alone."""

import torch

from recpeft import LoraAdamW


def test_dense_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = LoraAdamW([p1], lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW([p2], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(5, 3, dtype=torch.float64)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        ours.step(), theirs.step()
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)


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
    torch.testing.assert_close(sparse_p[[1, 4]], dense_rows, rtol=1e-12, atol=1e-12)
    untouched = [0, 2, 3, 5]
    assert torch.equal(sparse_p[untouched], start[untouched])
