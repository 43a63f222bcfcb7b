"""`python -m topoflow.experiment ...`: see topoflow/experiment/cli.py."""

import sys

from topoflow.experiment.cli import main

sys.exit(main())
