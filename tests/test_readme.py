"""README.md stays true: CI runs its test command, and its Python example runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_commands() -> list:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    main_job, tests = _bash_commands()
    assert "python cli.py fit --config configs/quickstart.yaml" in main_job and "pip install -e ." in main_job
    assert "python -m pytest" in tests and "[dev]" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = re.search(r"## Use it from Python\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
