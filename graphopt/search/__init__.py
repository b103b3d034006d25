"""`graphopt.tune`: an Optuna search over optimization configurations under an accuracy budget.

`space` (the knobs a model offers), `target` (where a trial is timed: torch, inductor, ONNX Runtime),
`tuner` (the study, its storage and `TuneResult`), `recipe` (a configuration made into a module: the one
code path of a trial and of `graphopt optimize --config`), `report` (the search's HTML page).
"""
