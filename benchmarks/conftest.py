"""``pytest benchmarks/``: a smoke run in seconds (tiny shapes, every contender once, results
checked against the float64 reference). ``pytest benchmarks/ --benchmark``: the full run (the
named workloads W1 and W2 and a shape sweep, interleaved rounds) that writes
``benchmarks/results/`` (the tables, and ``sweep.png`` when the sweep ran)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import harness
import pytest

RESULTS = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="full benchmark run (W1, W2, shape sweep; HATKERNELS_BENCH_ROUNDS rounds, "
        "default 5); writes benchmarks/results/results.{md,csv,json}",
    )


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> harness.Config:
    full = pytestconfig.getoption("--benchmark")
    harness.code_state()  # the code under test, read before anything runs
    rounds = int(os.environ.get("HATKERNELS_BENCH_ROUNDS", "5")) if full else 1
    return harness.Config(full=full, rounds=rounds)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The named workloads first, the optional shape sweep last."""
    items.sort(key=lambda item: "sweep" in item.name)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if harness.ROWS:
        terminalreporter.write_sep("=", "hatkernels benchmark tables")
        terminalreporter.write(harness.markdown(harness.machine_info(), _command(config)))


@pytest.fixture(autouse=True)
def _write_tables(bench: harness.Config, pytestconfig: pytest.Config):
    """In the full run, rewrite the tables after every test (a cut-short run keeps its rows)."""
    yield
    if bench.full and harness.ROWS:
        harness.write_results(RESULTS, _command(pytestconfig))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In a full run that timed the shape sweep, draw it (``benchmarks/results/sweep.png``)."""
    if not session.config.getoption("--benchmark") or not any(
            str(r.get("workload", "")).startswith("S ") for r in harness.ROWS):
        return
    import plot_sweep

    try:
        plot_sweep.plot(RESULTS / "results.json", RESULTS / "sweep.png")
    except Exception as exc:  # the tables are written; say why the chart is not
        print(f"\nbenchmarks/results/sweep.png not drawn: {type(exc).__name__}: {exc}")


def _command(config: pytest.Config) -> str:
    rounds = os.environ.get("HATKERNELS_BENCH_ROUNDS")
    env = f"HATKERNELS_BENCH_ROUNDS={rounds} " if rounds else ""
    return env + "pytest " + " ".join(config.invocation_params.args or sys.argv[1:])
