"""``python -m study.tracking serve``: the study's MLflow tracking server (see `study.tracking.server`)."""

import sys

from study.tracking.server import main

sys.exit(main())
