"""The oracle's block layout: which experts each domain owns. One place, used by the oracle router and by
`reference_precision` (which scores any router against its best relabeling of this layout)."""

from __future__ import annotations


def block_sizes(num_experts: int, num_domains: int) -> list[int]:
    """Sizes as equal as possible: the first E mod D domains get ceil(E/D) experts, the rest floor(E/D)."""
    if num_domains < 1 or num_experts < num_domains:
        raise ValueError(
            f"block layout needs 1 <= num_domains <= num_experts, got D={num_domains}, E={num_experts}"
        )
    base, extra = divmod(num_experts, num_domains)
    return [base + 1 if d < extra else base for d in range(num_domains)]


def block_layout(num_experts: int, num_domains: int) -> list[list[int]]:
    """Contiguous blocks B_d of expert ids: domain d owns experts [start_d, start_d + size_d)."""
    blocks, start = [], 0
    for size in block_sizes(num_experts, num_domains):
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks
