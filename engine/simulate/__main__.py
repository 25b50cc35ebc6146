import sys

from engine.simulate.cli import main

sys.exit(main())
