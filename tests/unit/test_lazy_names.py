"""A package's lazy names (``meterline.lazy``): loaded on first use, listed by ``dir``, and a module that
fails while it loads is reported as the failed import it is, with its cause."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text(
        "from meterline.lazy import lazy_names\n"
        "__getattr__, __dir__ = lazy_names(__name__, {'Light': 'light', 'Broken': 'broken'})\n"
    )
    (root / "light.py").write_text("Light = 'loaded'\n")
    # A dependency whose API changed: an AttributeError while the module loads.
    (root / "broken.py").write_text("import json\nBroken = json.no_such_function\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lazypkg"
    for name in [name for name in sys.modules if name.startswith("lazypkg")]:
        del sys.modules[name]


def test_a_name_loads_its_module_on_first_use(package: str) -> None:
    import lazypkg  # type: ignore[import-not-found]

    assert "lazypkg.light" not in sys.modules
    assert {"Light", "Broken"} <= set(dir(lazypkg))
    from lazypkg import Light

    assert Light == "loaded"
    assert "lazypkg.light" in sys.modules


def test_an_unknown_name_is_an_attribute_error(package: str) -> None:
    import lazypkg

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = lazypkg.Nope


def test_a_module_failing_as_it_loads_is_a_failed_import_with_its_cause(package: str) -> None:
    with pytest.raises(ImportError, match=r"lazypkg\.broken failed to load: .*no_such_function") as raised:
        from lazypkg import Broken  # noqa: F401
    assert isinstance(raised.value.__cause__, AttributeError)
