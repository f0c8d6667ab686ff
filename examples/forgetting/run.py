"""Issue #29's experiment, one command: `python examples/forgetting/run.py` (options: --help; docs/experiments.md).

LoRAMoE's claim (fine-tuning on downstream data erodes world knowledge; LoRAMoE with its constraint erodes less)
and PESC's (an upcycled model instruction-tunes better than the dense one under the same budget), in miniature on
SmolLM2-135M-Instruct; every (configuration, seed) is a cached, resumable unit under the work folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: the `forgetting` package

from forgetting.experiment import main  # noqa: E402 (after the path is set)

if __name__ == "__main__":
    main()
