"""Loading weights from a checkpoint into a configured model, with clear errors on mismatch."""

from __future__ import annotations

from pathlib import Path

import torch

from testbed.errors import CheckpointError


def load_weights(module: torch.nn.Module, path: str | Path, what: str = "init_from") -> None:
    """Copy every parameter of a Lightning checkpoint (or a plain state dict) into `module`.

    Missing, unexpected or mis-shaped tensors are reported by name; nothing is silently skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{what}: {path} is not a readable torch checkpoint ({err})") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path} holds no state_dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]),
            )
            if names
        )
        raise CheckpointError(
            f"{what}: {path} does not fit the configured model ({detail}); "
            "use the same model.* settings as the run that wrote it"
        )
    module.load_state_dict(state)
