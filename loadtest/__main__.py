"""`python -m loadtest SCENARIO ...`: the same as `tandem loadtest SCENARIO ...`."""
import sys

from loadtest.cli import main

sys.exit(main())
