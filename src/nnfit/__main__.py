import sys

from nnfit.cli import main

sys.exit(main())
