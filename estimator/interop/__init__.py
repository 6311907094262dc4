"""Exporters of plans to other RLHF frameworks' configurations and importers back, one module per
framework: :mod:`estimator.interop.verl`, :mod:`estimator.interop.openrlhf`, :mod:`estimator.interop.realhf`,
:mod:`estimator.interop.areal` and :mod:`estimator.interop.nemo_rl` (the names the commands take:
:mod:`estimator.interop.registry`); what they share (a change of
the plan and its reason, the projection that records each change, the export's files) is in
:mod:`estimator.interop.common`.

Each module's importer reads the configuration back into the experiment and the plan it
describes, and refuses by name any key it does not read; exporting and importing again gives
the projected plan.

An exporter turns an experiment and a plan into that framework's own configuration at a
stated commit of its repository. Where the framework cannot express the plan, it builds the
nearest plan it can run, in this project's vocabulary, and lists every change with the call,
the field and the reason; the commands above (:mod:`estimator.export`, ``python -m search
--export``) predict both plans.

May import: ``estimator.base`` and ``estimator.spec`` only (a plan file and an experiment are the
whole contract), never the cost model or the simulator.
"""

from __future__ import annotations

from estimator.interop.registry import FRAMEWORKS, IMPORTERS, exporter, importer

__all__ = ["FRAMEWORKS", "IMPORTERS", "exporter", "importer"]
