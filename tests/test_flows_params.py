"""flows.params: the shared parameter types, and ``described`` however a flow file loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FLOW_FILE = '''"""make-things: a flow file's summary line.

More words that the form does not show.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from flows.params import described


@described
def make_things(
    count: Annotated[int, Field(description="How many things")] = 3,
    name: str = "x",
) -> int:
    return count
'''


def test_described_works_for_a_flow_file_loaded_by_path_alone(tmp_path: Path) -> None:
    """As Prefect's deployments load an entrypoint: by file path, possibly without the
    module in ``sys.modules``."""
    path = tmp_path / "things.py"
    path.write_text(FLOW_FILE)
    spec = importlib.util.spec_from_file_location("things_not_registered", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "things_not_registered" not in sys.modules
    assert module.make_things.__doc__ == (
        "make-things: a flow file's summary line.\n\nArgs:\n    count: How many things"
    )
    assert module.make_things(2) == 2
