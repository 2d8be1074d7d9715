"""GENIE-M, block-wise reconstruction (GENIE Sec. 3.3):

- ``run``: ``reconstruct`` over every block, resume, the report;
- ``graph``: a block's training graph: the plan's quantizers in learnable forms (softbits, GENIE Eq. 13:
  ``quant.softbits``; LSQ + QDrop: ``quant.lsq``) and the GENIE-M loss (``graph.genie_m_loss``);
- ``train``: Adam on it: schedules, parameter groups, QDrop sampling, divergence;
- ``fallback``: what a block keeps (only what lowers its error; layer by layer where it cannot train);
- ``status``: what became of each block, as a typed value;
- ``checkpoint``, ``store``: finished blocks on disk, block data in RAM or memory-mapped.
"""

from .run import DEFAULT_LAMBDA, QUANTIZERS, check_args, check_lr_scale, reconstruct
from .status import BlockStatus

__all__ = ["DEFAULT_LAMBDA", "QUANTIZERS", "BlockStatus", "check_args", "check_lr_scale", "reconstruct"]
