"""The device side imports neither torch nor transformers (a device installs only [runtime])."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_no_training_stack():
    code = (
        "import sys\n"
        "import vishwamai_edge.cli, vishwamai_edge.runtime.session, vishwamai_edge.runtime.engine\n"
        "import vishwamai_edge.runtime.backends.llamacpp, vishwamai_edge.serve.app, vishwamai_edge.doctor\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'gguf', 'vishwamai_edge.export',"
        " 'vishwamai_edge.train') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
