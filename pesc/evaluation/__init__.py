"""`pesc eval`: benchmark any pesc model (export, converted folder, dense folder, training run) on lm-evaluation-harness.

`suites` names the papers' benchmark settings, `loading` builds the model object lm-eval's HF class wraps,
`harness` runs lm-eval, `report` writes the JSON and the Markdown tables.
"""
