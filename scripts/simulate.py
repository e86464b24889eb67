"""Replay a COCO dataset as an annotation session against livetrain and Label Studio (same as
``livetrain simulate``); see backend/simulation/session.py.

    python scripts/simulate.py --data ../shared/datasets/bccd --images 100 --start-label-studio --pace 10
    python scripts/simulate.py --data ../shared/datasets/bccd --via backend --start-label-studio --pace wait
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.simulation.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
