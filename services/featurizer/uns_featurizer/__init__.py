"""``uns run featurizer``: raw signals in, windows of features out, per device.

Waveforms (``datatype: waveform`` in the raw birth): RMS, peak, peak-to-peak,
crest factor, kurtosis, skewness, standard deviation, band energies, bearing
defect bands and envelope-spectrum amplitudes (when the shaft speed is known),
dominant frequency and spectral centroid. Numeric slow tags: mean, std, min,
max and slope per minute. Every features message carries its window's
provenance (start, end, good and total samples, source sequence range).
"""

from uns_featurizer.features import BearingGeometry, slow_features, waveform_features
from uns_featurizer.service import Featurizer
from uns_featurizer.settings import FeaturizerSettings

__all__ = [
    "BearingGeometry",
    "Featurizer",
    "FeaturizerSettings",
    "slow_features",
    "waveform_features",
]
