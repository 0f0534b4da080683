import sys

from tests.opinfo.runner import main

sys.exit(main())
