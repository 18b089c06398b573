"""`python -m nfm ...` is the `nfm` command."""

import sys

from nfm.pipeline.cli import main

sys.exit(main())
