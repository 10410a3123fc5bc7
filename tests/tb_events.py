"""Reading what a run logged to TensorBoard, as TensorBoard itself reads it."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(folder) -> dict[str, list[float]]:
    """Every scalar that the TensorBoard event files under ``folder`` hold, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in sorted(Path(folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return scalars
