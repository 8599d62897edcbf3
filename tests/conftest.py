from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Golden data computed with the published RCDM implementation (copied from shared/reference)."""
    return DATA / "reference"
