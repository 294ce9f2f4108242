"""Privacy building blocks.

- `fedloom.privacy.accounting` (re-exported here): accounting of client-level DP-FedAvg rounds
  on `dp_accounting` (RDP, PLD) and noise calibration;
- `fedloom.privacy.shamir`: Shamir secret sharing of seeds and keys (SecAgg+);
- `fedloom.privacy.masking`: X25519 + HKDF pairwise seeds, ChaCha20 / AES-CTR mask expansion,
  fixed-point encoding into Z_2^32 (SecAgg+).

The SecAgg+ protocol and the DP transforms that use them are not built yet (issue 5).
"""

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
