"""``uns replay FILE --device PATH``: a recorded file as one device's raw metrics.

How engineers back-test on historian exports and public data sets: the same
namespace messages an adapter would publish, with the file's own timestamps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_replay.frames import Recording, read_csv, read_npz
    from uns_replay.service import END_OF_REPLAY, Replayed, ReplaySettings, replay

__all__ = [
    "END_OF_REPLAY",
    "Recording",
    "ReplaySettings",
    "Replayed",
    "read_csv",
    "read_npz",
    "replay",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "END_OF_REPLAY": "service",
        "Recording": "frames",
        "Replayed": "service",
        "ReplaySettings": "service",
        "read_csv": "frames",
        "read_npz": "frames",
        "replay": "service",
    },
)
