import sys

from treg.cli import main

sys.exit(main())
