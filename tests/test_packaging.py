"""The wheel: setup.py finds every package below the mapped root folders, and the data files come along."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_config_and_kernel_source(tmp_path):
    # Build from a copy of the tracked files, so the checkout gets no build/ folder and nothing untracked helps.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("seqzoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def expected(folder: str, pattern: str) -> set[str]:
        return {f"seqzoo/{p.relative_to(source).as_posix()}" for p in (source / folder).rglob(pattern)}

    for folder in ("ops", "models", "training", "eval", "data", "configs"):
        modules = expected(folder, "*.py")
        assert modules and modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    data_files = expected("configs", "*.yaml") | expected("ops", "*.cpp")
    assert len(data_files) > 20 and data_files <= names, f"missing from the wheel: {sorted(data_files - names)}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
