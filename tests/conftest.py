import os
import sys
from pathlib import Path

# Shared test helpers (tests/runtime/toy.py) and the reproductions' harness and configurations
# (bench/repro) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent / "runtime"))
sys.path.insert(0, str(Path(__file__).parents[1] / "bench" / "repro"))

# Tests read the real datasets beside the project unless told otherwise.
os.environ.setdefault("FEDLOOM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
