"""Entry point for `accelerate launch scripts/train.py ict --data digits ...` (same flags as `gensample train`)."""
import sys

from gensample.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
