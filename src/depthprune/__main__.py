import sys

from depthprune.cli.main import main

sys.exit(main())
