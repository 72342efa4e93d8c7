import sys

from cleanai_core.cli import main

sys.exit(main())
