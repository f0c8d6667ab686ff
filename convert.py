"""`python convert.py SRC OUT [options]`: the same as `pesc convert SRC OUT [options]`."""

import sys

from pesc.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
