"""Run ``medseg3d train`` under torchrun and record, per rank, what each epoch left behind.

``torchrun --standalone --nproc_per_node=2 tests/ddp_probe.py RECORD_DIR STOP_AFTER train ...``
runs the real CLI with ``train_epoch`` wrapped: after each epoch every rank appends the digest of
its weights and the case ids it sampled from to ``RECORD_DIR/rank<R>.jsonl``. With STOP_AFTER > 0
all ranks raise KeyboardInterrupt (as Ctrl-C would) when that many epochs are done, once rank 0
has saved its state. Used by ``test_distributed.py``; not collected by pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names and tensor bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def recording(train_epoch: Callable[..., float], record: Path, stop_after: int
              ) -> Callable[..., float]:
    """``train_epoch`` that logs this rank's weights and cases, and stops after ``stop_after``."""
    done = 0

    def wrapper(model: torch.nn.Module, loader: DataLoader, *args: object, **kwargs: object
                ) -> float:
        nonlocal done
        if stop_after and done == stop_after:
            dist.barrier()  # rank 0 has written the previous epoch's state: a clean kill point
            raise KeyboardInterrupt
        loss = train_epoch(model, loader, *args, **kwargs)
        done += 1
        core = model.module if hasattr(model, "module") else model
        line = {"digest": weights_digest(core.state_dict()),
                "cases": [item["case"] for item in loader.dataset.items]}
        with record.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        return loss

    return wrapper


def main() -> None:
    """Wrap ``train_epoch``, then hand the remaining arguments to the medseg3d CLI."""
    record_dir, stop_after, *cli_args = sys.argv[1:]
    import medseg3d.training.loop
    from medseg3d.cli import app

    record = Path(record_dir) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    medseg3d.training.loop.train_epoch = recording(medseg3d.training.loop.train_epoch, record,
                                              int(stop_after))
    app(cli_args, prog_name="medseg3d")


if __name__ == "__main__":
    main()
