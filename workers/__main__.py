"""`python -m negcase`: the same as the `negcase` command."""

import sys

from negcase.cli.main import main

sys.exit(main())
