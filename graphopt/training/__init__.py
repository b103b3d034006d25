"""Training on an optimized graph: `finetuning` (`graphopt.finetune`: distillation from the original model
after pruning or int8) and `qat` (fake int8 on the layers the int8 pass quantizes, for `finetune(qat=True)`).
"""
