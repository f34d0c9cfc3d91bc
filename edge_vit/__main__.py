import sys

from edge_vit.cli import main

sys.exit(main())
