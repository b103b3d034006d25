"""Kernel tests: the Triton kernels run on CPU tensors, in Triton's interpreter.

No ``TRITON_INTERPRET=1`` is set here, on purpose. ``graphopt.kernels.launch``
sends every launch on CPU tensors to the interpreter at launch time, whatever
was imported first; ``test_ops.py`` checks both import orders in fresh
processes. Setting the variable in this file would come too late anyway once
another test module has imported ``torch._dynamo`` (which imports
``triton.language``), and on a GPU machine it would make the CUDA tests
interpret the kernels instead of compiling them.
"""
