"""pytest plugin: the conformance suite for any registered technique.

    pytest -p tts_plugins.testing --tts-plugin NAME [--tts-plugin OTHER] [--tts-examples 100] [--tts-engine vllm]

``NAME`` is a technique's ``name`` as registered through the ``tts_plugins``
entry-point group (``all``: every registered technique). Without explicit test
paths, only the conformance tests run; with paths, they run alongside yours.
Each test is one technique and one invariant (``-k slot_lifecycle`` selects one);
a failure names the technique, the invariant, the row and the parameters, and
says how to reproduce it. The invariants are documented in
:mod:`tts_plugins.testing.conformance`. ``--tts-engine vllm`` (or ``sglang``, repeatable)
adds the engine check: the technique's parameter sets, greedy, in a mixed batch
of the real engine on the bundled tiny model, must give the token ids of an
engine-neutral reference loop; passing it in both engines means both give the
same ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).with_name("_conformance_tests.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tts-plugins", "tts-plugins conformance suite")
    group.addoption("--tts-plugin", action="append", default=[], metavar="NAME",
                    help="technique name to check (repeatable; 'all' for every registered technique)")
    group.addoption("--tts-examples", type=int, default=40, metavar="N", help="hypothesis examples per invariant (default 40)")
    group.addoption("--tts-engine", action="append", default=[], choices=["vllm", "sglang"],
                    help="also check the technique in this real engine (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("tts_plugin") and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(TESTS)]  # no paths given: run the suite only
    elif config.getoption("tts_plugin"):
        config.args.append(str(TESTS))


def selected_techniques(config: pytest.Config) -> list[type]:
    from tts_plugins.manager import build_registry

    names = config.getoption("tts_plugin")
    registry = build_registry()
    by_name = {t.name: t for t in registry.techniques}
    if "all" in names:
        return list(by_name.values())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise pytest.UsageError(f"--tts-plugin {missing[0]!r} is not a registered technique; registered: {', '.join(sorted(by_name))}")
    return [by_name[n] for n in names]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tts_technique" in metafunc.fixturenames:
        techs = selected_techniques(metafunc.config)
        metafunc.parametrize("tts_technique", techs, ids=[t.name for t in techs])
    if "tts_engine_name" in metafunc.fixturenames:
        names = metafunc.config.getoption("tts_engine") or ["none"]  # "none" is dropped at collection
        metafunc.parametrize("tts_engine_name", names, ids=names, scope="session")


_ENGINES: dict[str, object] = {}


@pytest.fixture(scope="session")
def tts_engine(tts_engine_name: str):
    """One real engine at a time (the previous one is closed first)."""
    from tts_plugins.testing.conformance import TinyEngine

    if tts_engine_name not in _ENGINES:
        for other in list(_ENGINES):
            _ENGINES.pop(other).close()
        _ENGINES[tts_engine_name] = TinyEngine(tts_engine_name)
    return _ENGINES[tts_engine_name]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for name in list(_ENGINES):
        _ENGINES.pop(name).close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("tts_engine"):  # no engine asked for: the engine check is not collected at all
        items[:] = [i for i in items if "tts_engine_name" not in getattr(i, "fixturenames", ())]


@pytest.fixture
def tts_examples(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("tts_examples")
