"""The OmegaConf resolvers every YAML of this project may use (pipeline files and training
recipes alike); each loader calls register_resolvers() once:

    ${paper_taus:}                 the paper's kept fractions, pipeline/contract.py's TAUS: [0.0666667, 0.1111111, 0.1666667]
    ${paper_tau:medium}            one of them by its compression: large (1/15), medium (1/9), small (1/6)
    ${taus:${paper_taus:},[0.05]}  the rates of several lists, ascending, each once
    ${run_name:divico,${tau}}      the run name rule: divico-tau111
    ${nearest_tau:${tau},${vars.taus}}   the rate of a list nearest this one in log tau

A rate reaches a YAML value and a command line with seven digits (config_tau), the form every
shipped config and run name used before the taus had one statement.
"""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import OmegaConf

from pipeline.contract import TAUS, nearest_tau, run_name

COMPRESSIONS = ("large", "medium", "small")  # TAUS' order: the fewest kept tokens first


def config_tau(tau: float) -> float:
    return round(float(tau), 7)


def paper_tau(compression: str) -> float:
    if compression not in COMPRESSIONS:
        raise ValueError(f"${{paper_tau:{compression}}}: expected one of {COMPRESSIONS}")
    return config_tau(TAUS[COMPRESSIONS.index(compression)])


def taus(*lists: Iterable[float]) -> list[float]:
    return sorted({config_tau(tau) for values in lists for tau in values})


def register_resolvers() -> None:
    for name, resolver in (("paper_taus", lambda: taus(TAUS)), ("paper_tau", paper_tau), ("taus", taus),
                           ("run_name", run_name), ("nearest_tau", nearest_tau)):
        OmegaConf.register_resolver(name, resolver, replace=True)
