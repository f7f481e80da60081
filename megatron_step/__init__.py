"""megatron_step: STEP (staged parameter-efficient pre-training) on Megatron-Core.

Stage 1 trains a small LLaMA; each later stage grows it (new layers among the trained ones), freezes
the old layers behind LoRA adapters and trains the new layers and adapters. Entry points:
`python -m megatron_step` (the embedded tiny demo), `python -m megatron_step.train CONFIG.yaml`.

Importing the package changes nothing but one thing: megatron-core warns at import time, once per
module, that Transformer Engine and apex are missing, which is the normal state of a CPU machine;
those specific warnings are filtered here, before megatron-core is imported, and megatron_step logs
the backend it uses in one line instead (`log.describe_backend`).
"""

import warnings as _warnings

for _pattern in (r".*Transformer Engine and Apex are not installed.*",
                 r".*Apex is not installed.*"):
    _warnings.filterwarnings("ignore", message=_pattern)

__version__ = "0.1.0"
