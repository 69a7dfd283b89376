"""A non-editable install finds the built-in registry and the Python plans inside the package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_registry_and_plans(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheels.glob("tp_dtensor-*.whl"))], check=True, timeout=300)
    probe = (
        "import tp, tp.plan.registry as r; reg = tp.load_registry(); "
        "print(r.builtin_registry_path()); print(sorted(reg.families)); "
        "print(reg.python_plan_path('cohere').is_file())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    path, families, plan_found = out.stdout.splitlines()
    assert path == str(site / "tp" / "_builtin" / "registry.toml")
    assert "llama" in families and "mixtral" in families
    assert plan_found == "True"
