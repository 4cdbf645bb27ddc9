import sys

from llamaindex_kb.cli import main

sys.exit(main())
