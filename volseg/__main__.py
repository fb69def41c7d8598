import sys

from volseg.cli import main

sys.exit(main())
