"""Differential privacy: accounting of client-level DP-FedAvg rounds and noise calibration."""

from fedloom.privacy.accounting import (
    Accountant,
    Backend,
    DpFedAvgMechanism,
    PrivacyReport,
    SamplingKind,
    UnsupportedMechanismError,
    calibrate_noise,
)

__all__ = [
    "Accountant",
    "Backend",
    "DpFedAvgMechanism",
    "PrivacyReport",
    "SamplingKind",
    "UnsupportedMechanismError",
    "calibrate_noise",
]
