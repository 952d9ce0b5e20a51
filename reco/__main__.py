"""`python -m reco`: the command line (what `torchrun -m reco build-memory ...` runs)."""

import sys

from reco.cli import main

sys.exit(main())
