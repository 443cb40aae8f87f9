#!/usr/bin/env bash
# MONAI Label 0.8.5 against the bundles of this collection, in its own virtualenv: the tasks in-process
# (tests/test_monailabel.py) and the real server over HTTP (tests/test_monailabel_server.py).
#
# MONAI Label 0.8.5 pulls in pydicom-seg, which needs numpy<2 and pydicom<3, so it cannot share the main
# environment (numpy 2). The virtualenv sees the main environment's packages (--system-site-packages): torch,
# torchvision, monai, itk and meddet come from there, so no second torch is installed; only numpy 1.26, pydicom
# 2.x and MONAI Label's own dependencies go into the virtualenv (about 3 minutes, once).
#
# Usage: bash tools/monailabel_test.sh [extra pytest arguments]
#   MONAILABEL_VENV=/path/to/venv   where the virtualenv lives (default /tmp/mlvenv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONAILABEL_VENV:-/tmp/mlvenv}"

if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "monailabel==0.8.5" "numpy<2" "pydicom<3"
# meddet normally comes from the main environment (pip install -e . there); install it here otherwise
"$VENV/bin/python" -c "import meddet" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet -e "$REPO"
"$VENV/bin/python" -c "
import monailabel, numpy, torch, monai, meddet
print(f'monailabel {monailabel.__version__}, numpy {numpy.__version__}, torch {torch.__version__}, '
      f'monai {monai.__version__}, meddet {meddet.__version__}')
"
cd "$REPO"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest tests/test_monailabel.py tests/test_monailabel_server.py -q "$@"
