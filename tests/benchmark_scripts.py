"""The scripts of ``benchmarks/`` (not a package) loaded as modules by path, for the tests that run them."""
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: The helper modules the scripts import as top-level modules, with benchmarks/ first on sys.path.
HELPERS = ("environment", "timing", "stats", "report", "sweep", "step_cases")


def load_benchmark(name: str):
    """A fresh module object for ``benchmarks/<name>.py`` (executed now; each call is a new instance).

    benchmarks/ goes first on ``sys.path``, as when a script runs, so that a helper module loaded here finds its
    siblings (``sweep`` imports ``environment`` and ``timing``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
