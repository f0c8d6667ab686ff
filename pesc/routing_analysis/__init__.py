"""`pesc routes`: what the routers of a model do on some data, as numbers and pictures.

`records` is the ONE place that reads routing out of a model (one neutral record per routed site and
layer); everything after it works on those records: `tally` counts expert load, router entropy and
expert-group shares, `inputs` turns data files into token batches the way training does, `figures`
draws the PNGs, `report` writes JSON and CSV, `run` is the command end to end.
"""
