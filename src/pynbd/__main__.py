import sys

from pynbd.cli.main import main

sys.exit(main())
