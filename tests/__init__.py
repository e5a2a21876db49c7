import sys
from pathlib import Path

# scripts/proclib.py (ports, processes, polling) is shared by the scripts and tests/support:
# imported as `proclib`, one module (and one record of handed-out ports) per process.
_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
