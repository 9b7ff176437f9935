import sys

from nbutils.cli import main

sys.exit(main())
