import sys

from nanoseek.cli import main

sys.exit(main())
