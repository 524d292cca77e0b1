import sys

from faircalib.cli import main

sys.exit(main())
