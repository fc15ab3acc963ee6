"""Anomaly analysis of spoken-digit recordings from AudioMNIST.

The package is a DVC pipeline: one module per stage (``fetch``, ``spectra``,
``detect``, ``embed``, ``cluster``, ``inspect``), each run as
``python -m audiomnist_anomalies.<stage>``, plus shared modules for audio
input, parameter validation and atomic output writing.
"""

__version__ = "0.1.0"
