"""Bootstrap over validation documents: documents found on the device from EOS, sums by hand."""

import pytest
import torch

from testbed.train.doc_bootstrap import DocumentLosses


def test_documents_follow_eos_across_rows_and_batches():
    losses = DocumentLosses(num_domains=2, capacity=16, device=torch.device("cpu"))
    # domain 0's stream: 5 | 0 6 7 8 | 0 9 ...; domain 1's: 1 2 3 4 5 6 ... (one document)
    batch1 = torch.tensor([[5, 0, 6], [1, 2, 3], [7, 8, 0]])  # rows: d0 window 0, d1 window 0, d0 window 1
    losses.add(batch1, torch.tensor([0, 1, 0]), torch.arange(9, dtype=torch.float32))
    batch2 = torch.tensor([[9, 9, 9], [4, 5, 6]])  # d0 window 2 (document 2 goes on), d1 window 1
    losses.add(batch2, torch.tensor([0, 1]), torch.full((6,), 10.0))
    sums = losses.sums.view(2, 16)
    counts = losses.counts.view(2, 16)
    # d0: target 0 (after input 5) in document 0; targets 1, 2 (after the EOS) and 6, 7 in document 1;
    # target 8 (after the second EOS) and the three of batch 2 in document 2
    assert counts[0, :3].tolist() == [1, 4, 4] and sums[0, :3].tolist() == [0.0, 1 + 2 + 6 + 7, 8 + 30.0]
    assert counts[1, 0] == 6 and sums[1, 0] == 3 + 4 + 5 + 30 and counts[1, 1:].sum() == 0


def test_bootstrap_interval_by_construction():
    same = DocumentLosses(1, 8, torch.device("cpu"))
    same.sums[:3], same.counts[:3] = torch.tensor([4.0, 8.0, 2.0]), torch.tensor([2.0, 4.0, 1.0])  # all 2.0
    assert same.bootstrap()["val/doc_ci95"] == 0.0
    spread = DocumentLosses(1, 8, torch.device("cpu"))
    spread.sums[:2], spread.counts[:2] = torch.tensor([10.0, 30.0]), torch.tensor([10.0, 10.0])  # 1.0 and 3.0
    out = spread.bootstrap(draws=4000)
    # two equal-sized documents: the resampled mean is 1, 2 or 3 with probability 1/4, 1/2, 1/4
    assert out["val/doc_ci95"] == pytest.approx(1.0) and out["val/documents_min"] == 2.0
