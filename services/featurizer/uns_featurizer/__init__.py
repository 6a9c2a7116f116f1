"""``uns run featurizer``: raw signals in, windows of features out, per device.

Waveforms (``datatype: waveform`` in the raw birth): RMS, peak, peak-to-peak,
crest factor, kurtosis, skewness, standard deviation, band energies, bearing
defect bands and envelope-spectrum amplitudes (when the shaft speed is known),
dominant frequency and spectral centroid. Numeric slow tags: mean, std, min,
max and slope per minute. Every features message carries its window's
provenance (start, end, good and total samples, source sequence range).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_featurizer.features import (
        SLOW_UNITS,
        WAVEFORM_UNITS,
        BearingGeometry,
        slow_features,
        waveform_features,
    )
    from uns_featurizer.service import TAGS_PER_MESSAGE, Featurizer
    from uns_featurizer.settings import FeaturizerSettings
    from uns_featurizer.windows import SlowWindow

__all__ = [
    "SLOW_UNITS",
    "TAGS_PER_MESSAGE",
    "WAVEFORM_UNITS",
    "BearingGeometry",
    "Featurizer",
    "FeaturizerSettings",
    "SlowWindow",
    "slow_features",
    "waveform_features",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "SLOW_UNITS": "features",
        "TAGS_PER_MESSAGE": "service",
        "WAVEFORM_UNITS": "features",
        "BearingGeometry": "features",
        "Featurizer": "service",
        "FeaturizerSettings": "settings",
        "SlowWindow": "windows",
        "slow_features": "features",
        "waveform_features": "features",
    },
)
