"""The device runs without torch: a text, an image and an audio bundle answer through `chat` in a
process where importing torch, transformers or peft fails (as on a device that has none of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from speech_bundles import question_wav, speech_bundle  # noqa: F401
from vlm_bundles import photo, vlm_bundle  # noqa: F401

# A meta-path finder ahead of every other: these packages cannot be imported at all in the child.
BLOCKED = ("torch", "transformers", "peft")
RUN = f"""
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on this device")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["vishwamai-edge"] + sys.argv[1:]
runpy.run_module("vishwamai_edge.cli", run_name="__main__")
"""


def chat(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, "chat", str(bundle), "--max-tokens", "8", "--threads", "2",
                           *args], capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    proc = subprocess.run([sys.executable, "-c", RUN.replace('runpy.run_module("vishwamai_edge.cli", '
                                                            'run_name="__main__")', "import torch")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "torch is not installed on this device" in proc.stderr


def test_a_text_bundle(embedded_bundle):
    proc = chat(embedded_bundle, "-p", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_an_image_bundle(vlm_bundle, tmp_path):  # noqa: F811
    image = tmp_path / "photo.png"
    Image.fromarray(photo(64, 80, 0)).save(image)
    proc = chat(vlm_bundle, "--image", str(image), "-p", "What is in the picture?")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 image(s) encoded" in proc.stderr


@pytest.mark.slow  # the speech bundle exports the real Whisper tiny.en
def test_an_audio_bundle(speech_bundle, question_wav):  # noqa: F811
    proc = chat(speech_bundle, "--audio", str(question_wav))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "capital" in proc.stderr.lower() + proc.stdout.lower()  # the transcript is shown
