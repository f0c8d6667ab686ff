"""Issue #29's experiment: LoRAMoE's and PESC's central claims in miniature (docs/experiments.md).

Run it with `python examples/forgetting/run.py`; the modules are the facts and tasks it trains and probes on,
the scorer, the configurations, the evaluation, the report and the driver (experiment.py).
"""
