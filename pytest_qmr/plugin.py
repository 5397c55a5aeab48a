"""pytest plugin: every model x quantizer x benchmark cell of a suite file is one test item.

``pytest suites/smoke.yaml`` collects the cells, ``-k gptq`` selects them, and each cell compares
the quantized model item by item against the committed FP baseline in ``baselines/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from .errors import QmrError
from .records import CellResult
from .redact import install as install_redaction
from .redact import redact

SESSION_KEY = pytest.StashKey["QmrSession"]()
CELL_IDS_KEY = pytest.StashKey[dict]()  # cell id -> the suite file that collected it
RESULT_PROPERTY = "qmr_result"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmr", "quantized-model reasoning gate (pytest-qmr)")
    group.addoption("--qmr-suite", action="append", default=[], metavar="PATH",
                    help="collect the cells of this suite file (repeatable)")
    group.addoption("--qmr-update-baselines", action="store_true",
                    help="(re)compute the FP baselines of the selected cells and write them atomically")
    group.addoption("--qmr-baselines", metavar="DIR", default=None,
                    help="baseline directory (default: <rootdir>/baselines)")
    group.addoption("--qmr-run-dir", metavar="DIR", default=None,
                    help="where cell records go (default: <rootdir>/qmr-runs/<timestamp>)")
    group.addoption("--qmr-data-dir", metavar="DIR", default=None,
                    help="benchmark data directory (overrides the suite's data_dir and QMR_DATA_DIR)")
    group.addoption("--qmr-tasks", action="append", default=[], metavar="DIR",
                    help="an lm-eval task folder added to every suite's task search path (repeatable)")
    group.addoption("--qmr-cache-dir", metavar="DIR", default=None,
                    help="model / quantized-checkpoint cache (default: QMR_CACHE_DIR or ~/.cache/pytest-qmr)")
    group.addoption("--qmr-no-cache", action="store_true",
                    help="neither read nor write the generation and Restore-adapter cache (everything regenerates)")
    group.addoption("--qmr-resume", action="store_true",
                    help="reuse cells already finished in --qmr-run-dir instead of re-running them")
    group.addoption("--qmr-report", metavar="DIR", default=None,
                    help="write report.html, report.md and report.json of the run into DIR at the end of the session")


def pytest_addhooks(pluginmanager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


class DefaultRestore:
    """The built-in pytest_qmr_restore (runs last: a conftest.py implementation returning a result wins)."""

    def __init__(self, session) -> None:
        self.session = session

    @pytest.hookimpl(trylast=True)
    def pytest_qmr_restore(self, cell, result, records, context):
        from .restore.cell import restore_cell

        return restore_cell(self.session, cell, result, records, context)


@pytest.fixture
def qmr_restore(request):
    """What a cell runs to restore itself: the ``pytest_qmr_restore`` hook, called with keyword
    arguments ``cell``, ``result``, ``records``, ``context``. Override this fixture in a ``conftest.py`` to wrap
    or replace Restore for the cells under it (e.g. another teacher, or a budget per directory)."""
    return request.config.hook.pytest_qmr_restore


def _suite_args(config: pytest.Config) -> list[str]:
    """``--qmr-suite`` paths, checked (one line each) and resolved."""
    paths = []
    for given in config.getoption("--qmr-suite"):
        path = Path(given).expanduser()
        if not path.exists():
            raise pytest.UsageError(f"--qmr-suite {given}: no such file")
        if path.is_dir():
            raise pytest.UsageError(f"--qmr-suite {given}: a directory; name a suite file (e.g. {given}/smoke.yaml)")
        if path.suffix not in (".yaml", ".yml"):
            raise pytest.UsageError(f"--qmr-suite {given}: not a .yaml suite file")
        paths.append(str(path.resolve()))
    return paths


def register_method_markers(config: pytest.Config) -> None:
    """One marker per registered quantization method (``-m gptq``). Called at configure time and
    again when a suite file is collected, for a method a conftest.py below the rootdir registers."""
    from .registry import QUANT_METHODS

    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for method in QUANT_METHODS.names():
        if method not in known:
            config.addinivalue_line("markers", f"{method}: qmr cells quantized with method {method}")


def pytest_configure(config: pytest.Config) -> None:
    install_redaction()  # before anything can log a key (lm-eval logs failed requests with their headers)
    config.addinivalue_line("markers", "qmr_cell: a model x quantizer x benchmark cell from a suite file")
    register_method_markers(config)
    from .session import QmrSession

    _check_directories(config)
    run_dir = config.getoption("--qmr-run-dir")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        _share_cpu_between_workers(int(workerinput.get("workercount", 1)))
        from .engines.devices import pin_worker_device

        pin_worker_device()  # before quantization or loading can touch a GPU
    if workerinput and workerinput.get("qmr_run_dir"):
        run_dir = workerinput["qmr_run_dir"]
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.rootpath) / "qmr-runs" / f"{stamp}-{os.getpid()}"
    config.stash[SESSION_KEY] = QmrSession(
        rootdir=Path(config.rootpath),
        run_dir=Path(run_dir).resolve(),
        baselines_dir=Path(config.getoption("--qmr-baselines") or Path(config.rootpath) / "baselines").resolve(),
        update_baselines=config.getoption("--qmr-update-baselines"),
        data_dir=Path(config.getoption("--qmr-data-dir")).resolve() if config.getoption("--qmr-data-dir") else None,
        cache_dir=Path(config.getoption("--qmr-cache-dir")).resolve() if config.getoption("--qmr-cache-dir") else None,
        resume=config.getoption("--qmr-resume"),
        use_cache=not config.getoption("--qmr-no-cache"),
    )
    session = config.stash[SESSION_KEY]
    session.progress = _progress_writer(config)
    session.restore_hook = config.hook.pytest_qmr_restore
    config.pluginmanager.register(DefaultRestore(session), "qmr-default-restore")
    config.pluginmanager.register(QmrReporter(session), "qmr-reporter")
    suites = _suite_args(config)
    if suites and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = suites  # only the suites, not testpaths or the current directory as well
    elif suites:
        config.args.extend(suites)


def _check_directories(config: pytest.Config) -> None:
    """The baseline and cache directories, before any cell generates: one line each when one is a
    file, or when ``--qmr-update-baselines`` could not write its baselines."""
    from .baselines import writable_dir_problem
    from .fsutil import cache_root, check_cache_dir

    given = config.getoption("--qmr-baselines")
    baselines = Path(given or Path(config.rootpath) / "baselines")
    if baselines.exists() and not baselines.is_dir():
        raise pytest.UsageError(f"--qmr-baselines {given or baselines}: a file, expected the directory of baselines "
                                "(<model>/<benchmark>.json)")
    if config.getoption("--qmr-update-baselines") and (problem := writable_dir_problem(baselines)) is not None:
        raise pytest.UsageError(f"--qmr-baselines {given or baselines}: {problem}; --qmr-update-baselines writes "
                                "the baselines there")
    try:
        if config.getoption("--qmr-cache-dir"):
            check_cache_dir(Path(config.getoption("--qmr-cache-dir")).expanduser(), "--qmr-cache-dir")
        else:
            cache_root()
    except QmrError as exc:
        raise pytest.UsageError(str(exc)) from None


def _progress_writer(config: pytest.Config):
    """Per-cell progress lines on the terminal while a cell runs (pytest captures the stages'
    own output). Off with ``-q``, on xdist workers (the controller shows each finished cell) and
    without a terminal reporter; never part of a test's captured output or JUnit record."""
    if config.get_verbosity() < 0 or hasattr(config, "workerinput"):
        return None

    def write(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")  # registered after our configure
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(redact(line), cyan=True)
            reporter.flush()

    return write


def _share_cpu_between_workers(workers: int) -> None:
    """xdist workers split the cores instead of each spinning up one thread per core.

    N processes x all cores oversubscribes the CPU and torch's thread pools then spin against
    each other (several times slower than one process). Only when the user set no thread count;
    children (pytester subprocesses, servers) inherit it through the environment.
    """
    if workers <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: every worker writes into the controller's run directory."""
    node.workerinput["qmr_run_dir"] = str(node.config.stash[SESSION_KEY].run_dir)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the family is the cells that will run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items) -> None:
    """Count the selected cells of each ``thresholds.family``; each is gated at ``alpha / m``.
    (Every xdist worker collects the same selection, so each counts the same ``m``.)"""
    sizes: dict[str, int] = {}
    for item in items:
        if isinstance(item, CellItem) and item.cell.thresholds.family != "none":
            sizes[item.cell.thresholds.family] = sizes.get(item.cell.thresholds.family, 0) + 1
    config.stash[SESSION_KEY].family_sizes = sizes


def _is_suite_file(file_path: Path, parent: pytest.Collector) -> bool:
    if file_path.suffix not in (".yaml", ".yml"):
        return False
    return parent.session.isinitpath(file_path) or file_path.parent.name == "suites"


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if _is_suite_file(file_path, parent):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


class SuiteFile(pytest.File):
    """A suite YAML; yields one CellItem per model x quantizer x benchmark."""

    def collect(self):
        from .suite import check_references, load_suite

        try:
            suite = load_suite(self.path, extra_tasks=self.config.getoption("--qmr-tasks"))
            check_references(suite)
        except QmrError as exc:
            raise self.CollectError(str(exc)) from None
        register_method_markers(self.config)
        owners = self.config.stash.setdefault(CELL_IDS_KEY, {})
        for cell in suite.cells():  # records go to <run dir>/cells/<cell id>: one suite per id
            other = owners.setdefault(cell.id, str(self.path))
            if other != str(self.path):
                raise self.CollectError(f"{suite.source}: cell {cell.id!r} is also a cell of {other}; both would write "
                                        "one record directory, rename a model, quantizer or benchmark in one of them")
        for cell in suite.cells():
            item = CellItem.from_parent(self, name=cell.id, cell=cell)
            item.add_marker(pytest.mark.qmr_cell)
            item.add_marker(getattr(pytest.mark, cell.quantizer.method))
            if cell.benchmark.name in cell.quantizer.expect_fail_on:
                item.add_marker(pytest.mark.xfail(
                    reason=f"suite expects quantizer {cell.quantizer.name} to regress", raises=GateFailed, strict=True))
            elif cell.benchmark.name in cell.quantizer.expect_inconclusive_on:
                item.add_marker(pytest.mark.xfail(
                    reason=f"suite expects {cell.benchmark.name}'s items too few to settle {cell.quantizer.name}",
                    raises=CellInconclusive, strict=True))
            yield item

    class CollectError(Exception):
        pass

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance(self.CollectError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class CellFailed(QmrError):
    """A cell ended failed; raised as one of the three kinds below, so a strict xfail can demand
    that the gate itself said FAIL (``expect_fail_on`` uses ``raises=GateFailed``; ``expect_inconclusive_on``
    ``raises=CellInconclusive``)."""


class GateFailed(CellFailed):
    """The paired gate said FAIL: the drop exceeds a margin and McNemar p < alpha."""


class ProfileViolated(CellFailed):
    """The gate did not fail, but an ``error_profile`` threshold was violated."""


class CostExceeded(CellFailed):
    """The gate did not fail, but the answers cost more than ``thresholds.max_length_ratio`` allows."""


class CellInconclusive(CellFailed):
    """The gate was inconclusive and the suite counts that as failing (``thresholds.inconclusive``)."""


class CellNotServable(CellFailed):
    """The cell's engine has no kernel for its checkpoint (``outcome: not_servable``): not a pass."""


class RestoreFailed(QmrError):
    """The suite's ``restore.min_gain`` was not won back (or Restore could not run)."""


def cell_test(request: pytest.FixtureRequest, qmr_restore) -> None:
    """The body of every cell item: pytest resolves its fixtures the way it does for any test
    function (``qmr_restore`` from the nearest ``conftest.py`` that overrides it), then it runs."""
    request.node.run_cell(qmr_restore)


class CellItem(pytest.Function):
    """One cell as a pytest test: a :class:`pytest.Function` whose function is :func:`cell_test`
    (so fixtures, ``-k``, ``-m``, xfail and xdist treat it as any test), with the cell's own
    failure line and report sections."""

    def __init__(self, *, cell, **kwargs) -> None:
        super().__init__(callobj=cell_test, **kwargs)
        self.cell = cell

    def run_cell(self, restore) -> None:
        session = self.config.stash[SESSION_KEY]
        result = session.run_cell(self.cell, restore=restore)
        self.user_properties.append((RESULT_PROPERTY, json.dumps(_summary_row(result))))
        if result.gate is not None:
            for key in ("fp_acc", "quant_acc", "delta", "p_value", "n", "verdict"):
                self.user_properties.append((f"qmr_{key}", getattr(result.gate, key)))
        if result.outcome == "not_servable":
            raise CellNotServable(result.notes[0])
        self.add_report_section("call", "qmr", cell_section(result))
        shortfall = (result.restore or {}).get("shortfall")
        if shortfall:  # not a CellFailed: a suite that expects the cell to regress still needs the repair
            raise RestoreFailed(shortfall)
        if result.outcome == "fail":
            raise failure_of(result)

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(QmrError):  # on purpose: one line; anything else is a bug and keeps its traceback
            return f"{self.cell.id}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"qmr cell {self.cell.id}"


def cell_section(result: CellResult) -> str:
    """The cell's terminal section: verdict, notes, error profile, Restore, cache, records, seconds."""
    from .locate import profile_summary

    lines = [result.gate.summary()] if result.gate else []
    lines += result.notes
    if result.reused:
        lines.append("reused from --qmr-resume (inputs unchanged)")
    elif result.recomputed:
        lines.append(f"recomputed despite --qmr-resume: {result.recomputed}")
    if result.error_profile is not None:
        lines.append("error profile: " + profile_summary(result.error_profile))
    lines += [f"error profile threshold violated: {v}" for v in result.profile_violations]
    if result.sampling is not None:
        s = result.sampling
        lines.append(f"sampled: {s['samples']} answers per item (temperature {s['temperature']}, top_p {s['top_p']}, "
                     f"seed {s['seed']}): pass@{s['samples']} {result.pass_at_k:.3f}, maj@{s['samples']} "
                     f"{result.maj_at_k:.3f}, std over seeds {result.seed_std:.3f}")
    if result.length is not None:
        ci = result.length.get("ratio_ci")
        lines.append(f"length: {result.length['quant_mean_tokens']:.1f} tokens per answer vs FP "
                     f"{result.length['fp_mean_tokens']:.1f}, ratio {result.length['ratio']:.3f}"
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    if result.truncated_share is not None:
        lines.append(f"truncated (thinking never closed): {result.truncated_share:.1%} of answers")
    lines += [f"cost threshold violated: {v}" for v in result.cost_violations]
    r = result.restore or {}
    if r.get("error"):
        lines.append(f"restore: {r['error']}")
    elif r.get("restored_acc") is not None:
        recovered = "" if r.get("recovered") is None else f", recovered {r['recovered']:.0%} of the loss"
        lines.append(f"restore: FP {r['fp_acc']:.3f} -> quantized {r['quant_acc']:.3f} -> restored "
                     f"{r['restored_acc']:.3f} (McNemar vs quantized p={r['p_value']:.3g}{recovered}; "
                     f"{r['pairs']} {r['variant']} pairs from the {r['teacher']} teacher, {r['steps']} DPO steps, "
                     f"{r['minutes']:.1f} min)")
    cached = [f"{stage} {c['items_from_cache']}/{c['items']}" for stage, c in result.cache.items()
              if isinstance(c, dict) and c.get("items")]
    if cached:
        lines.append("from the generation cache (items): " + ", ".join(cached)
                     + ("" if result.cache.get("enabled", True) else " (--qmr-no-cache)"))
    lines.append(f"samples: {result.samples_path}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)


def failure_of(result: CellResult) -> CellFailed:
    """The exception of a failed cell: which part of the gate failed it, and why, in one line."""
    gate = result.gate
    message = gate.summary() if gate else "cell failed"
    if result.profile_violations:
        message += "; error profile: " + "; ".join(result.profile_violations)
    if result.cost_violations:
        message += "; cost: " + "; ".join(result.cost_violations)
    if gate is not None and gate.verdict == "fail":
        return GateFailed(message)
    if result.profile_violations:
        return ProfileViolated(message)
    if result.cost_violations:
        return CostExceeded(message)
    return CellInconclusive(message + " (thresholds.inconclusive: fail)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Every report pytest shows or writes (terminal, JUnit, xdist) is redacted of secrets."""
    report = yield
    report.sections = [(title, redact(text)) for title, text in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        clean = redact(text)
        if clean != text:
            report.longrepr = clean
    return report


def _summary_row(result: CellResult) -> dict:
    gate = result.gate
    return {
        "cell": result.cell_id,
        "acc": result.accuracy,
        "n": result.n,
        "fp_acc": gate.fp_acc if gate else None,
        "delta": gate.delta if gate else None,
        "delta_ci": gate.delta_ci if gate else None,
        "p": gate.p_value if gate else None,
        "verdict": gate.verdict if gate else result.outcome,
        "outcome": result.outcome,
        "restored_acc": (result.restore or {}).get("restored_acc"),
        "reused": result.reused,
        "recomputed": result.recomputed,
    }


class QmrReporter:
    """Collects cell rows from test reports (also those xdist workers send) for the summary."""

    def __init__(self, session) -> None:
        self.session = session
        self.rows: list[dict] = []
        self.report_line: str | None = None
        self.warnings: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == RESULT_PROPERTY:
                self.rows.append(json.loads(value))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        if getattr(session.config, "workerinput", None) is not None:
            return  # only the controller aggregates
        from .rundir import apply_family, write_results

        try:
            self.warnings = apply_family(self.session.run_dir) + write_results(self.session.run_dir)
        except OSError as exc:  # a full disk or a read-only run dir: one line and a failed run, not a crash
            self.warnings = [f"qmr: ERROR: {self.session.run_dir}: run records not written "
                             f"({type(exc).__name__}: {exc.strerror or exc})"]
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        report_dir = session.config.getoption("--qmr-report")
        if report_dir:
            self.report_line = self._write_report(session.config.invocation_params.dir / report_dir)

    def _write_report(self, directory: Path) -> str:
        """Never raises: a report that cannot be written is one warning line, not a pytest crash."""
        try:
            from .report import build_report, write_all

            paths = write_all(build_report(self.session.run_dir, self.session.baselines_dir), directory)
            return f"qmr report: {paths['html']}"
        except Exception as exc:  # noqa: BLE001
            return f"qmr report: WARNING: not written ({type(exc).__name__}: {' '.join(str(exc).split())})"

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config: pytest.Config) -> None:
        for line in self.warnings:
            terminalreporter.write_line(line, red="ERROR" in line, yellow="ERROR" not in line)
        if self.report_line:
            terminalreporter.write_line(self.report_line, yellow="WARNING" in self.report_line)
        if not self.rows:
            return
        tr = terminalreporter
        tr.section("qmr cells")
        tr.write_line(f"{'cell':<48} {'FP':>6} {'quant':>6} {'Δ':>7} {'Δ CI':>16} {'n':>5} {'p':>9}  verdict")
        for row in sorted(self.rows, key=lambda r: r["cell"]):
            fp = "" if row["fp_acc"] is None else f"{row['fp_acc']:.3f}"
            delta = "" if row["delta"] is None else f"{row['delta']:+.3f}"
            p = "" if row["p"] is None else f"{row['p']:.3g}"
            ci = "" if not row.get("delta_ci") else f"[{row['delta_ci'][0]:+.3f}, {row['delta_ci'][1]:+.3f}]"
            line = (f"{row['cell']:<48} {fp:>6} {row['acc']:>6.3f} {delta:>7} {ci:>16} {row['n']:>5} {p:>9}  "
                    f"{row['verdict']}")
            if row.get("restored_acc") is not None:
                line += f" (restored {row['restored_acc']:.3f})"
            if row.get("reused"):
                line += " (reused)"
            tr.write_line(line)
        for row in sorted(self.rows, key=lambda r: r["cell"]):
            if row.get("recomputed"):
                tr.write_line(f"recomputed {row['cell']}: {row['recomputed']}")
        tr.write_line(f"records: {self.session.run_dir}")

