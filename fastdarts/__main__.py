import sys

from fastdarts.cli import main

sys.exit(main())
