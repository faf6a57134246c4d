"""Make docs/napari_correction.png: a head segmented, 5 marks placed, Update pressed (before | after).

Run from the repository root after ``python data/prepare.py BrainMask`` and
``benchmarks/interactive.py`` (whose simulated user's first clicks on the head are placed here)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_correction_screenshot.py

Everything goes through the "medseg3d: segment" widget as a user drives it: Run, Add marks
(the points are the simulated user's clicks, in the file's voxel indices), Update.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLICKS = ROOT / "benchmarks" / "results" / "interactive" / "brainmask_test" / "sri24.adapt.json"


def wait_for(widget: object) -> None:
    """Let the widget's worker finish, as the event loop would."""
    from qtpy.QtWidgets import QApplication

    while widget.worker is not None:
        QApplication.processEvents()
        time.sleep(0.05)
    QApplication.processEvents()


def main() -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ROOT / "data/BrainMask/imagesTr/sri24_0000.nii.gz")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "napari_correction.png")
    args = parser.parse_args()
    record = json.loads(CLICKS.read_text())
    points = np.asarray(record["clicks"][:args.clicks], dtype=float)
    values = np.asarray(record["values"][:args.clicks], dtype=np.int64)

    import imageio.v3 as iio
    import napari

    from medseg3d_napari._widget import SegmentWidget

    viewer = napari.Viewer(show=True, title="medseg3d")
    viewer.window.resize(1200, 900)
    (image,) = viewer.open(str(args.image), plugin="medseg3d")
    _, widget = viewer.window.add_plugin_dock_widget("medseg3d", "medseg3d: segment")
    assert isinstance(widget, SegmentWidget)
    widget.set_model_source("brainmask")
    widget.run()
    wait_for(widget)
    marks = widget.add_marks_layer()
    marks.data = points  # the reader keeps a RAS file's voxel axes: data = file voxel indices
    marks.features = {"value": values}
    marks.refresh()
    viewer.dims.order = (1, 2, 0)  # coronal: rows S, columns R; the vertex and the neck show
    viewer.dims.set_point(1, float(marks.data_to_world(points[0])[1]))
    scene = getattr(viewer, "scene", viewer)  # napari >= 0.9 moved the camera to viewer.scene
    scene.camera.orientation2d = ("up", "right")  # superior at the top
    viewer.reset_view()
    before = viewer.screenshot(canvas_only=True, flash=False)
    started = time.perf_counter()
    widget.update_correction()
    wait_for(widget)
    print(f"update: {time.perf_counter() - started:.1f} s; {widget.status.text()}")
    after = viewer.screenshot(canvas_only=True, flash=False)
    height = min(before.shape[0], after.shape[0])  # the status line may resize the canvas
    iio.imwrite(args.output, np.concatenate([before[:height], after[:height]], axis=1))
    print(f"wrote {args.output}")
    viewer.close()
    return args.output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
