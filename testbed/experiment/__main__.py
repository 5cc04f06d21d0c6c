"""`python -m testbed.experiment`: the same as `testbed-experiment`."""

import sys

from testbed.experiment.cli import main

sys.exit(main())
