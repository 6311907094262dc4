"""The exporters and importers by framework name, and the one lookup that names a wrong name."""

from __future__ import annotations

from types import ModuleType

from estimator.base.errors import ConfigError, did_you_mean
from estimator.interop import areal, nemo_rl, openrlhf, realhf, verl

# name → exporter module (each has FRAMEWORK, REPO, COMMIT and export(experiment, plan, ...))
EXPORTERS: dict[str, ModuleType] = {
    "verl": verl, "openrlhf": openrlhf, "realhf": realhf, "areal": areal, "nemo-rl": nemo_rl}
FRAMEWORKS = tuple(EXPORTERS)
# name → importer: (config text, device profile name) → (the experiment file's mapping, plan, notes)
IMPORTERS = {"verl": verl.import_overrides, "openrlhf": openrlhf.import_command, "realhf": realhf.import_overrides,
             "areal": areal.import_config, "nemo-rl": nemo_rl.import_config}


def exporter(name: str) -> ModuleType:
    """The exporter module of framework ``name``; ConfigError naming it otherwise."""
    if name not in EXPORTERS:
        raise ConfigError(f"framework {name!r} is not one the planner exports to{did_you_mean(name, FRAMEWORKS)}; "
                          f"choose one of {', '.join(FRAMEWORKS)}")
    return EXPORTERS[name]


def importer(name: str):
    """The importer of framework ``name``; ConfigError naming it otherwise."""
    if name not in IMPORTERS:
        raise ConfigError(f"--from {name!r}: the planner imports configs of {', '.join(IMPORTERS)}"
                          f"{did_you_mean(name, IMPORTERS)}")
    return IMPORTERS[name]
