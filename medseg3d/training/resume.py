"""``--resume``: save and restore everything a run needs to continue exactly where it stopped.

``save_state`` / ``load_state`` pack weights, weight average, optimizer and RNG state with the
``TrainingState`` into the run folder's state file (``RunFolder.write_state``): one atomically
written file, so a kill at any moment leaves either the previous or the next state. A new length
for a resumed run comes from ``medseg3d.runs.extend``.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg3d.runs import RunFolder, TrainingState, unwrap


def save_state(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
               average: nn.Module | None, state: TrainingState) -> None:
    """Everything needed to resume, in the run folder's state file."""
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v for k, v in average.state_dict().items()})
    opt = optimizer.state_dict()
    keys: dict[str, list[str]] = {}
    for pid, pstate in opt["state"].items():
        keys[str(pid)] = []
        for name, value in pstate.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value)
            keys[str(pid)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    state = state.model_copy(update={"optimizer_groups": opt["param_groups"],
                                     "optimizer_keys": keys})
    run.write_state(tensors, state)


def load_state(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
               average: nn.Module | None) -> TrainingState:
    """Restore model, average, optimizer and RNG from ``save_state``'s file; return the rest."""
    tensors, state = run.read_state()
    unwrap(model).load_state_dict(_with_prefix(tensors, "model."))
    if average is not None:
        saved = _with_prefix(tensors, "ema.")
        average.load_state_dict(saved or _with_prefix(tensors, "model."))
    optimizer.load_state_dict({
        "state": {int(pid): {n: tensors[f"optim.{pid}.{n}"] for n in names}
                  for pid, names in state.optimizer_keys.items()},
        "param_groups": state.optimizer_groups,
    })
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
