"""The end-to-end training-step benchmark (slothc/train_bench.py; also ``slothc bench``).

    python3 bench/train_step.py --workload a b c --out-dir bench/results      # GPU
    python3 bench/train_step.py --workload tiny --device cpu                   # CPU smoke run
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's slothc

from slothc.train_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
