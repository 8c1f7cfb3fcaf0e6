"""``python -m cxr_pipeline.batch``: same as the ``cxr-batch`` command."""

import sys

from cxr_pipeline.batch.cli import main

sys.exit(main())
