"""`python -m fedloom` is the `fedloom` command."""

import sys

from fedloom.cli import main

sys.exit(main())
