"""The wheel ships the product only: no tests, benchmarks, emulator or parity cases."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_only_the_product(tmp_path):
    src = tmp_path / "src"       # a copy: building writes build/ and egg-info next to the sources
    top_level_outputs = {".git", ".venv", ".whl", "build", "out", "engines"}
    shutil.copytree(ROOT, src, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == ROOT and n in top_level_outputs) or n.endswith(".egg-info")])
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("talkrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("talkrt-") or not n.split("/")[0].endswith(".dist-info")]
    assert all(n.startswith("talkrt/") for n in code), [n for n in code if not n.startswith("talkrt/")]
    forbidden = ("test", "bench", "emulat", "parity")
    assert not [n for n in code if any(word in n.lower() for word in forbidden)]
    # what the product needs is there: the runtime, the kernels' sources, the configs, the build step
    for needed in ("talkrt/pipeline.py", "talkrt/stages.py", "talkrt/kernels/compose_nv12.cu",
                   "talkrt/configs/musetalk.yaml", "talkrt/build_engines/cli.py"):
        assert needed in names
