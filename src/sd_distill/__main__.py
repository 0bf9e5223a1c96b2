import sys

from sd_distill.cli import main

sys.exit(main())
