"""The scripts of ``benchmarks/`` (not a package) loaded as modules by path, for the tests that run them."""
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A fresh module object for ``benchmarks/<name>.py`` (executed now; each call is a new instance)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
