"""Make docs/napari_screenshot.png: the demo T1 segmented by a shipped model in the napari plugin.

Run from the repository root after ``python data/prepare.py BrainMaskT1`` (and with a shipped
model in ``medseg3d/models/``)::

    xvfb-run -a python docs/make_screenshot.py            # headless Linux (Debian: xvfb)
    python docs/make_screenshot.py --model runs/brain     # a desktop, or any run dir / checkpoint
    xvfb-run -a python docs/make_screenshot.py --also-show uncertainty  # docs/napari_uncertainty.png

Without a display, the script starts a virtual one itself when PyVirtualDisplay and Xvfb are
installed. Segmentation goes through the plugin's own code: the reader places the scan in RAS mm,
``segmentation_job`` runs the model, and the "medseg3d: segment" widget adds the labels layer and
fills its table of volumes, exactly as after pressing Run. ``--also-show`` picks the widget's
"also show" map (foreground probability or entropy), which the widget adds above the labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
OUTPUT = DOCS / "napari_screenshot.png"


def default_model() -> str:
    """The first shipped model, or the package default name when none is listed."""
    from medseg3d import zoo

    cards = zoo.list_models()
    names = [card.name for card in cards]
    return zoo.DEFAULT_MODEL if zoo.DEFAULT_MODEL in names or not names else names[0]


def ensure_display() -> object | None:
    """Start a virtual X display when there is none (Linux, headless); return it to stop later."""
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        sys.exit("no display: run `xvfb-run -a python docs/make_screenshot.py` "
                 "(or pip install PyVirtualDisplay)")
    return Display(visible=False, size=(1600, 1000)).start()


def main(argv: list[str] | None = None) -> Path:
    """Open, segment and screenshot; return the PNG path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="shipped model name, run dir or checkpoint "
                                        "(default: the first shipped model)")
    parser.add_argument("--image", type=Path, help="scan to open (default: the demo T1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--also-show", default="none", choices=("none", "probability",
                                                                  "uncertainty"),
                        help="add the widget's probability or uncertainty map too")
    parser.add_argument("--output", type=Path,
                        help="PNG to write (default: docs/napari_screenshot.png, or "
                             "docs/napari_<map>.png with --also-show)")
    args = parser.parse_args(argv)
    output = args.output or (OUTPUT if args.also_show == "none"
                             else DOCS / f"napari_{args.also_show}.png")

    from medseg3d_napari._core import JobProgress, load_model, run_to_end, segmentation_job
    from medseg3d_napari._sample_data import demo_t1_path

    # Fail on a missing scan or model before any window opens.
    image_path = args.image or demo_t1_path()
    model_source = args.model or default_model()
    model = load_model(model_source, device=args.device)

    display = ensure_display()
    import napari
    from qtpy.QtWidgets import QApplication

    from medseg3d_napari._widget import SegmentWidget, layer_world_affine

    viewer = napari.Viewer(show=True, title="medseg3d")
    viewer.window.resize(1500, 900)
    (image,) = viewer.open(str(image_path), plugin="medseg3d")
    _, widget = viewer.window.add_plugin_dock_widget("medseg3d", "medseg3d: segment")
    assert isinstance(widget, SegmentWidget)
    widget.set_model_source(model_source)  # shows the model's name and labels in the widget
    widget.map_combo.setCurrentIndex(widget.map_combo.findData(args.also_show))

    started = time.perf_counter()
    job = segmentation_job(model, np.asarray(image.data), layer_world_affine(image),
                           device=args.device, layer_name=image.name,
                           also_show=args.also_show)
    steps: list[JobProgress] = []

    def report(step: JobProgress) -> None:
        steps.append(step)
        print(f"\r{step.message:<60}", end="", flush=True)

    result = run_to_end(job, report)
    print(f"\nsegmented {image_path.name} with {result.model_name} in "
          f"{time.perf_counter() - started:.1f} s")
    widget.show_progress(steps[-1])
    labels = widget.add_result(image, result)
    for r in range(widget.table.rowCount()):
        print("  " + "  ".join(widget.table.item(r, c).text() for c in range(4)))

    if result.voxel_map is not None:
        outline_on_top(viewer, labels)
    show_axial(viewer, result.labels, labels)
    output.parent.mkdir(parents=True, exist_ok=True)
    QApplication.processEvents()  # lay out the dock widget: segmentation blocked the event loop
    viewer.screenshot(str(output), canvas_only=False, flash=False)
    print(f"wrote {output}")
    viewer.close()
    if display is not None:
        display.stop()
    return output


def outline_on_top(viewer: object, labels: object) -> None:
    """The mask as a cyan outline above the map: a filled mask under it would be hidden."""
    from napari.utils.colormaps import DirectLabelColormap

    labels.contour = 1
    labels.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                      **dict.fromkeys(np.unique(labels.data)[1:],
                                                                      "cyan")})
    labels.opacity = 1.0
    viewer.layers.move(viewer.layers.index(labels), len(viewer.layers))


def show_axial(viewer: object, labels: np.ndarray, layer: object) -> None:
    """Axial slice through the segmentation's centre, anterior up, patient's right on the right."""
    centre = np.argwhere(labels).mean(0) if labels.any() else np.array(labels.shape) / 2
    world = layer.data_to_world(centre)
    viewer.dims.order = (2, 1, 0)  # slider on z (S); rows y (A), columns x (R)
    viewer.dims.set_point(2, float(world[2]))
    scene = getattr(viewer, "scene", viewer)  # napari >= 0.9 moved the camera to viewer.scene
    scene.camera.orientation2d = ("up", "right")  # y grows upwards: anterior at the top
    viewer.reset_view()


if __name__ == "__main__":
    from medseg3d.errors import MedsegError

    try:
        main()
    except MedsegError as exc:  # missing data or model: one line, no traceback
        sys.exit(f"error: {exc}")
