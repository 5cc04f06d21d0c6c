"""Per-run uncertainty of the validation loss: a bootstrap over validation documents.

The validation windows of a domain tile its packed stream in order (documents joined by EOS), and the
validation loader visits each domain's windows in that order, so the document of every target token is
known on the device without a host sync: the running number of EOS tokens of its domain before it.
`DocumentLosses` sums the token losses and counts per (domain, document) during validation. At its end,
`bootstrap` resamples the documents of each domain with replacement (the domain's loss = its resampled
loss sum / resampled token count; `val/loss` = the mean over domains, as in training) and reports
`val/doc_ci95`: half the width of the 95% percentile interval of `val/loss` over 1,000 draws. It is
the run's sampling uncertainty from the choice of validation documents, next to the spread over seeds.
Off (absent from the summary) under data parallelism, where ranks see different windows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from testbed.data.datamodule import EOS_ID

DRAWS = 1000


class DocumentLosses:
    def __init__(self, num_domains: int, capacity: int, device: torch.device):
        self.capacity = capacity  # documents per domain at most (a bound: one per validation token + 1)
        self.sums = torch.zeros(num_domains * capacity, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_domains * capacity, dtype=torch.float64, device=device)
        self.eos_seen = torch.zeros(
            num_domains, dtype=torch.long, device=device
        )  # EOS read so far, per domain
        self.num_domains = num_domains

    @classmethod
    def for_validation(cls, module) -> DocumentLosses | None:
        trainer = module._trainer  # None outside a Trainer (testbed-analyze's own validation loop)
        if trainer is None:
            return None
        datamodule = getattr(trainer, "datamodule", None)
        val_set = getattr(datamodule, "val_set", None)
        if trainer.world_size > 1 or val_set is None or not len(val_set):
            return None
        windows = int(np.diff(val_set.offsets).max(initial=0))
        seq_len = val_set.parts[0].seq_len
        return cls(len(module.domains), windows * seq_len + 1, module.device)

    def add(self, input_ids: Tensor, row_domains: Tensor, token_loss: Tensor) -> None:
        """One batch: inputs [B, S], each row's domain [B], the loss of each target token [B * S]."""
        eos = (input_ids == EOS_ID).long()  # a target after an EOS input starts the next document
        per_row = eos.sum(dim=1)  # [B]
        onehot = torch.nn.functional.one_hot(row_domains, self.num_domains) * per_row.unsqueeze(1)  # [B, D]
        before = (
            (onehot.cumsum(dim=0) - onehot).gather(1, row_domains.unsqueeze(1)).squeeze(1)
        )  # same domain, earlier rows
        base = self.eos_seen[row_domains] + before  # [B]
        self.eos_seen += onehot.sum(dim=0)
        documents = base.unsqueeze(1) + eos.cumsum(dim=1)  # [B, S]
        index = (row_domains.unsqueeze(1) * self.capacity + documents.clamp_max(self.capacity - 1)).reshape(
            -1
        )
        self.sums.index_add_(0, index, token_loss.double())
        self.counts.index_add_(0, index, torch.ones_like(token_loss, dtype=torch.float64))

    def bootstrap(self, seed: int = 0, draws: int = DRAWS) -> dict[str, float]:
        sums = self.sums.view(self.num_domains, self.capacity).cpu().numpy()
        counts = self.counts.view(self.num_domains, self.capacity).cpu().numpy()
        rng = np.random.default_rng(seed)
        total = np.zeros(draws)
        used = 0
        documents = []
        for d in range(self.num_domains):
            present = counts[d] > 0
            if not present.any():
                continue
            s, c = sums[d][present], counts[d][present]
            picks = rng.integers(0, len(s), size=(draws, len(s)))
            total += s[picks].sum(axis=1) / c[picks].sum(axis=1)
            used += 1
            documents.append(len(s))
        if not used:
            return {}
        low, high = np.percentile(total / used, [2.5, 97.5])
        return {"val/doc_ci95": float(high - low) / 2, "val/documents_min": float(min(documents))}
