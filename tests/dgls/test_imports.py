"""The language server never imports torch: the model lives in the engine process."""

from __future__ import annotations

import subprocess
import sys


def test_the_server_does_not_import_torch() -> None:
    code = "import sys, dgls.server, dgls.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
