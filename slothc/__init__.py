"""slothc: a torch.compile backend that fuses LoRA/QLoRA fine-tuning patterns into Triton kernels.

    model = torch.compile(model, backend="slothc")       # no import needed: found by entry point
    print(slothc.explain(model, **batch))                 # what was fused, what was skipped and why
"""

from slothc.backend import explain
from slothc.report import Report

__version__ = "0.1.0"
__all__ = ["explain", "Report", "__version__"]
