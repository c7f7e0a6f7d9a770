import sys

from kbuild_bolt.cli import main

sys.exit(main())
