"""``python -m plugins.parallel simulate --pp 8 --micro-batches 20 [--f 1 --b 2 --w 1 --fb 2.5]``:
time DualPipe, DualPipeV and 1F1B, write timeline PNGs and compare bubbles with report Table 2."""

import sys

from .pipeline_sim import main

sys.exit(main())
