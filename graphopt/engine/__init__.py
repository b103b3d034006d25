"""The engine every graph change goes through, for FX and ONNX graphs alike.

`ir` (the FX graph helpers and parameter counters), `rules` (the `Rule`/`RuleSet` abstraction and the
reason codes of every rejection), `pass_manager` (the IR-agnostic `PassManager`: copy, run, verify, time,
keep or roll back), `pipeline` (which passes a level and its options run), `config` and `schemes` (the
options and the quantization schemes' names), `verify` (fidelity against a budget), `speed` and `timing`
(the speed check and the project's one timer).
"""
