"""The benchmark harness and CLI: the one place where speed and memory are measured.

Installed as ``softmax_ce_gpu.bench``; the console script ``softmax-ce-bench`` runs
:func:`softmax_ce_gpu.bench.cli.main`. One concept per module:

    cli.py              arguments, defaults (GPU or CPU mode), the ``inspect`` subcommand
    op.py               what an op is to the bench (Op, Impl) and the exceptions a provider raises
    op_cross_entropy.py the cross_entropy op: inputs, float64 reference, byte formula, providers
    registry.py         the registered ops, provider names and dtypes; adding an op is one line here
    check.py            comparison with the float64 reference, the tolerance table
    timing.py           do_bench on the GPU, perf_counter on the CPU, the copy bandwidth
    harness.py          one case: check, measure memory, time; records
    report.py           machine and version header, the terminal table, the JSON file
    plot.py             GB/s against V from the JSON alone
    compiled.py         torch.compile per case, time-boxed on CPU

The ``hf-memory`` subcommand (hf_memory.py) measures the peak memory of a Hugging Face
causal LM's forward+backward, stock vs patched by softmax_ce_gpu.integrations.transformers.

The ``inspect`` subcommand (inspect.py, with aot.py and byte_count.py) gathers the
evidence that needs no GPU; cli.py imports it only when that subcommand is used.
"""
