import sys

from tests.opinfo.runner import main

if __name__ == "__main__":
    sys.exit(main())
