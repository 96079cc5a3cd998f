"""Entry point for `python scripts/sample.py PIPELINE_DIR --num-inference-steps 2 ...` (= `gensample sample`)."""
import sys

from gensample.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
