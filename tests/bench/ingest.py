"""Ingest benchmark: `python tests/bench/ingest.py [--events N] [--json]`.

Runs `negcase bench ingest`: the raw XREADGROUP+XACK loop, the detector with the archive
off and on (ratios to raw), and XADD-to-queue latency at a steady 1,000 events/s.
"""

import sys

from negcase.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ingest", *sys.argv[1:]]))
