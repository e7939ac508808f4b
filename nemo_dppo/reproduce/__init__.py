"""`nemo-dppo reproduce`: the paper's analysis (Sections 5-6, App. G.2) as named experiments on the sanity task.

`experiments.py` says what runs (methods = config overrides, one shared config, no per-method tuning),
`runner.py` runs them side by side (one thread each, resumable), `analysis.py` turns metrics into the stated
summaries and verdicts, `figures.py` and `report.py` write the PNGs and `report.md`.
"""
