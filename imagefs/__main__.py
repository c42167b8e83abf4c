import sys

from imagefs.cli import main

sys.exit(main())
