"""One canonical layout for pooled embedding lookups.

``nn.EmbeddingBag`` accepts bags in several forms: 1-D ids with ``offsets`` (with or without
``include_last_offset``), 2-D fixed-length ids, optional ``per_sample_weights``, a
``padding_idx`` and sum or mean pooling. Every form is the same sum

    pooled_j = Σ_{i ∈ I_j} w_i · T[ids_i]

over the ids ``I_j`` of bag j, where w_i is the per-sample weight (1 when absent) times
1/|I_j| for mean pooling (|I_j| counts the non-padding ids) and padding ids are dropped.
:func:`bag_layout` turns any input form into that sum's terms, so the adapter ops need only one.

Shapes: L ids after padding is dropped, nb bags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class BagLayout:
    """Bags as a weighted sum over contiguous runs of ids.

    Attributes:
        ids: [L] int64, the ids that contribute (padding ids removed), grouped by bag in order.
        bag_of_id: [L] int64, the bag each id belongs to (non-decreasing).
        offsets: [nb] int64, start of each bag in ``ids``; empty bags repeat the next start.
        weights: [L] float or None: w_i as in the module docstring; None means every w_i is 1.
        num_bags: nb.
    """

    ids: torch.Tensor
    bag_of_id: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    num_bags: int


def check_id_dtype(ids: torch.Tensor, table_name: str) -> None:
    """Raise TypeError unless ``ids`` is an int32 or int64 tensor."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{table_name}: ids must be an int32 or int64 tensor, got {got}")


def validate_ids(ids: torch.Tensor, num_embeddings: int, table_name: str) -> None:
    """Raise IndexError naming the table, the first bad id and its position unless every id is
    in [0, num_embeddings)."""
    check_id_dtype(ids, table_name)
    if ids.numel() == 0:
        return
    flat = ids.reshape(-1)
    low, high = torch.aminmax(flat)
    if low.item() >= 0 and high.item() < num_embeddings:
        return
    position = int(((flat < 0) | (flat >= num_embeddings)).nonzero()[0, 0])
    raise IndexError(
        f"{table_name}: id {int(flat[position])} at position {position} is out of range [0, {num_embeddings})"
    )


def _bags_from_offsets(
    num_ids: int, offsets: torch.Tensor, include_last_offset: bool, table_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Return (bag starts, bag lengths, bag_of_id, number of ids used) for 1-D ids split by
    ``offsets``."""
    if offsets.dim() != 1:
        raise ValueError(f"{table_name}: offsets must be 1-D, got shape {tuple(offsets.shape)}")
    check_id_dtype(offsets, f"{table_name} offsets")
    offsets = offsets.to(torch.int64)
    if include_last_offset:
        if offsets.numel() == 0:
            raise ValueError(f"{table_name}: include_last_offset needs at least one offset")
        starts, ends = offsets[:-1], offsets[1:]
    else:
        starts = offsets
        ends = torch.cat([offsets[1:], offsets.new_tensor([num_ids])])
    if starts.numel() and int(starts[0]) != 0:
        raise ValueError(f"{table_name}: offsets[0] must be 0, got {int(starts[0])}")
    lengths = ends - starts
    if (lengths < 0).any() or (ends.numel() and int(ends[-1]) > num_ids):
        raise ValueError(f"{table_name}: offsets must be non-decreasing and at most the number of ids ({num_ids})")
    bags = torch.arange(starts.numel(), device=offsets.device)
    used = int(ends[-1]) if ends.numel() else 0
    return starts, lengths, torch.repeat_interleave(bags, lengths, output_size=used), used


def bag_layout(
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    *,
    num_embeddings: int,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    weight_dtype: torch.dtype = torch.float32,
    table_name: str = "embedding bag",
    validate: bool = True,
) -> BagLayout:
    """Canonical :class:`BagLayout` of one ``nn.EmbeddingBag`` call.

    Args:
        input: [L] ids with ``offsets``, or [nb, T] ids (one bag per row) without them.
        offsets: [nb] (or [nb + 1] with ``include_last_offset``) bag starts, or None for 2-D input.
        num_embeddings: rows of the table, for the range check.
        mode: "sum" or "mean".
        per_sample_weights: optional weights shaped like ``input`` (sum mode only).
        include_last_offset: offsets carry the end of the last bag too.
        padding_idx: id that contributes nothing (and is not counted by mean pooling).
        weight_dtype: dtype of the returned weights (the table's dtype).
        table_name: named in every error.
        validate: check the id range; with False out-of-range ids read arbitrary memory in
            fused kernels and raise inside torch here.
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"{table_name}: LoRA supports sum and mean pooling, not {mode!r}")
    check_id_dtype(input, table_name)
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"{table_name}: per_sample_weights are only supported with mode='sum'")
        if per_sample_weights.shape != input.shape:
            raise ValueError(
                f"{table_name}: per_sample_weights shape {tuple(per_sample_weights.shape)} does "
                f"not match input shape {tuple(input.shape)}"
            )
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError(f"{table_name}: offsets must be None when input is 2-D")
        num_bags, bag_len = input.shape
        ids = input.reshape(-1)
        bag_of_id = torch.arange(num_bags, device=input.device).repeat_interleave(bag_len)
        used = ids.numel()
        lengths = torch.full((num_bags,), bag_len, dtype=torch.int64, device=input.device)
        starts = torch.arange(num_bags, device=input.device) * bag_len
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError(f"{table_name}: offsets are required when input is 1-D")
        starts, lengths, bag_of_id, used = _bags_from_offsets(input.numel(), offsets, include_last_offset, table_name)
        num_bags = offsets.numel() - int(include_last_offset)
        ids = input[:used]
    else:
        raise ValueError(f"{table_name}: input must be 1-D or 2-D, got shape {tuple(input.shape)}")
    if validate:
        validate_ids(ids, num_embeddings, table_name)
    ids = ids.to(torch.int64)

    weights = None
    if per_sample_weights is not None:
        weights = per_sample_weights.reshape(-1)[:used].to(weight_dtype)
    counts, bag_offsets = lengths, starts
    if padding_idx is not None:
        keep = ids != padding_idx
        ids, bag_of_id = ids[keep], bag_of_id[keep]
        weights = weights[keep] if weights is not None else None
        counts = torch.bincount(bag_of_id, minlength=num_bags)
        bag_offsets = torch.cumsum(counts, 0) - counts
    if mode == "mean":
        inverse = 1.0 / counts.clamp(min=1).to(weight_dtype)
        weights = inverse[bag_of_id] if weights is None else weights * inverse[bag_of_id]
    return BagLayout(ids, bag_of_id, bag_offsets, weights, num_bags)


def unpooled_layout(ids: torch.Tensor, padding_idx: int | None) -> BagLayout:
    """Layout of a plain lookup (``nn.Embedding``): every id is its own bag of weight 1, and a
    padding id is an empty bag. ``ids`` of any shape is flattened row-major."""
    flat = ids.reshape(-1).to(torch.int64)
    bags = torch.arange(flat.numel(), device=ids.device)
    if padding_idx is not None:
        keep = flat != padding_idx
        flat, bags = flat[keep], bags[keep]
        offsets = torch.cumsum(keep, 0) - keep.to(torch.int64)
    else:
        offsets = bags.clone()
    return BagLayout(flat, bags, offsets, None, ids.numel())
