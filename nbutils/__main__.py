import sys

from nbutils.run.cli import main

sys.exit(main())
