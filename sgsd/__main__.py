import sys

from sgsd.cli import main

sys.exit(main())
