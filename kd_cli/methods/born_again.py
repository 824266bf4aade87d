"""`method=born_again`: Born-Again Networks (Furlanello et al., ICML 2018), self-distillation over
generations. Generation 1 learns from the teacher; generation k+1 learns, with the KD loss, from the
trained student of generation k (a fresh network of the same architecture each time). With the
student's architecture as the teacher (`teacher=X student=X`) this is the paper's setting.

The loss of each generation is Hinton's KD (`kd.py`); the generations themselves are run by the
distill stage, which reads `method.generations` from the config: one generation is one run of the
loop, so the loop stays the same for every method.
"""

from __future__ import annotations

from kd_cli.methods import register_method
from kd_cli.methods.kd import KD
from kd_cli.registry import NonNegative, PositiveInt, Temperature


@register_method("born_again")
class BornAgain(KD):
    loss_weights = ("kd_weight", "ce_weight")

    def __init__(
        self,
        student,
        teacher,
        *,
        generations: PositiveInt,
        temperature: Temperature,
        kd_weight: NonNegative,
        ce_weight: NonNegative,
        logit_standardization: bool,
    ):
        # `generations` is read by the distill stage (it runs the loop once per generation), not here
        super().__init__(
            student,
            teacher,
            temperature=temperature,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            logit_standardization=logit_standardization,
        )
