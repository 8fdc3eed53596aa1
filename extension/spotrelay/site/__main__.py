import sys

from spotrelay.site.cli import main

sys.exit(main())
