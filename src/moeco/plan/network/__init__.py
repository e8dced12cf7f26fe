"""The network in the planner: fat-tree, multi-plane and multi-rail graphs, a flow-level (max-min
fair) simulation of collectives on them, ECMP / adaptive / static routing, failures, latency.

    graph.py        topologies as graphs of directed links        flows.py     max-min fairness, completion
    paths.py        routing modes, PXN, rerouting                 latency.py   Table 5's alpha model
    collectives.py  collectives and MoE dispatch as flow sets     failures.py  link / switch / plane
    simulate.py     one collective end to end                     paper.py     the paper's figures vs the model
"""

from moeco.plan.network.simulate import make_network, simulate, sweep

__all__ = ["make_network", "simulate", "sweep"]
