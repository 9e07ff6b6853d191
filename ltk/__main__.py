import sys

from ltk.cli import main

sys.exit(main())
