"""The README's Python quickstart runs as printed (with fewer rounds)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_learns() -> None:
    (code,) = re.findall(r"## Quickstart.*?```python\n(.*?)```", README.read_text(), re.S)
    assert len(code.splitlines()) < 40
    code = code.replace("rounds=20", "rounds=3").replace("print(", "accuracy = (")
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    accuracy = namespace["accuracy"]
    assert isinstance(accuracy, list) and len(accuracy) == 3
    assert accuracy[-1] > 0.5  # 3 rounds of pathological non-IID FedAvg is far above chance
