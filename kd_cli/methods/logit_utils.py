"""Helpers shared by the logit methods (kd, dkd, dist): logit standardization.

Logit standardization: Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).
Each sample's logits are z-scored over the classes before the temperature is applied, so the
student matches the teacher's logit *relations* rather than their range and scale.
"""

from __future__ import annotations

import torch

# Added to the standard deviation as in the authors' code (`normalize` in their KD.py), so a sample
# whose logits are all equal (std 0) standardizes to zeros instead of dividing by zero.
STANDARDIZE_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row over the classes: (z - mean) / (std + eps).

    The std is Bessel-corrected (torch's default), as in the authors' code; the choice only rescales
    every standardized logit by the same sqrt(C / (C - 1)).
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + STANDARDIZE_EPS)


def tempered(logits: torch.Tensor, temperature: float, logit_standardization: bool) -> torch.Tensor:
    """Logits ready for a temperature softmax: standardized first when asked, then divided by T."""
    if logit_standardization:
        logits = standardize(logits)
    return logits / temperature
