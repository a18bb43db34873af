"""GPU-test settings, read before seqzoo.ops is imported.

- One kernel config each, no autotuning (``ops.utils.AUTOTUNE``): every config is a separate compile,
  which a correctness run across many shapes and dtypes cannot afford and does not need.
- ``SEQZOO_GPU_REPORT=path``: each test's outcome and duration, and a failure's report, are appended to
  ``path`` as soon as the test ends. A GPU lease ends at a hard time limit, and pytest prints failure
  details only at the end of the session.
"""

import os

import pytest

os.environ.setdefault("SEQZOO_AUTOTUNE", "0")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("SEQZOO_GPU_REPORT")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist the controller receives every report
        return
    if path and (report.failed or report.when == "call"):
        with open(path, "a") as f:
            f.write(f"{report.nodeid} {report.when} {report.outcome} {report.duration:.1f}s\n")
            if report.failed:
                f.write(report.longreprtext + "\n\n")
