"""`python -m modalmesh` is the `modalmesh` command."""

import sys

from modalmesh.cli import main

sys.exit(main())
