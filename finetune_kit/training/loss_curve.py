"""The loss-curve PNG of a job: train and validation loss per step."""

import os
import tempfile
from pathlib import Path

from finetune_kit.disk_space import disk_full_error, is_disk_full


def write_loss_curve(
    path: Path, steps: list[int], train_loss: list[float | None], valid_loss: list[float | None], title: str
) -> Path:
    """Plot the losses to a PNG at `path` (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs in terminals, CI and detached trainers
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for label, values in (("train loss", train_loss), ("validation loss", valid_loss)):
        points = [(step, value) for step, value in zip(steps, values, strict=True) if value is not None]
        if points:
            axes.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 50 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: `train watch` and `models` may draw the same curve at once, neither holding the writer lock
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png")
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise
    return path
