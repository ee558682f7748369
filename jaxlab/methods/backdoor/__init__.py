"""Backdoor attack on dynamic multi-exit networks (Dong et al., INFOCOM 2023, multiexit_backdoor.md;
official code chichidd/BackdoorDynamicDNN on Shallow-Deep-Networks).

task.py: the attack as four stages of one trainer run (clean, ics, poison, victim); triggers.py: the
triggers and poisoning; data.py: images from any source; analysis.py: per-exit accuracy / ASR, early
exit across tau and start exit, exit distribution and MACs; defenses.py: Neural Cleanse, STRIP,
DF-TND and fine-pruning; report.py: `jaxlab report --config backdoor:tiny`.

Inferred (no code or text to follow): the watermark image (the reference's PNG is not shipped; a
procedural ring-and-cross stand-in with the reference's blending), the SDN placement rule for depths
SDN gives no mask for, and the defenses' decision rules for STRIP and fine-pruning (see defenses.py).
"""

from jaxlab.methods.backdoor.task import (  # noqa: F401
    MultiExitModel,
    attach_exits,
    build,
    build_with_model,
    exit_outputs,
    exit_split,
    poison_objective,
    strip_exits,
)
from jaxlab.methods.backdoor.report import report  # noqa: F401  (jaxlab report --config backdoor:tiny)
