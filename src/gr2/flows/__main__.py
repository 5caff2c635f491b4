"""`python -m gr2.flows` is the `gr2` command."""

import sys

from gr2.flows.cli import main

sys.exit(main())
