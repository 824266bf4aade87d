import os
import sys
from pathlib import Path

# One thread per process: `make test` runs one pytest worker per core (pytest-xdist), and each `kd`
# subprocess inherits this. Several processes each spinning 2 OpenMP threads on 2 cores run many
# times slower than one thread each. (Same seed, same thread count -> identical numbers.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests' shared helpers (formats.py, kdrun.py)
