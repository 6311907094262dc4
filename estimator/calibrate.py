"""``python -m estimator.calibrate``: measure or import a hardware profile.

The calibration pipeline lives in :mod:`calibration.pipeline` (microbenchmarks, fits and the
importers of public tables need torch and the executor's model code, which the estimator never
imports); this module only forwards to it, importing it when it runs, so the arrow from the
estimator up into ``calibration`` exists here alone. Usage and flags: :mod:`calibration.pipeline`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from calibration.pipeline import main as run

    return run(argv)


if __name__ == "__main__":
    from estimator.base.errors import cli_guard

    sys.exit(cli_guard(main, None))
