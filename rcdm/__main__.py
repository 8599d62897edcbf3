import sys

from rcdm.cli import main

sys.exit(main())
