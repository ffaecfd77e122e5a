"""adapterops' microbenchmark suite (`python -m benchmarks`) and the no-GPU kernel report
(`python -m benchmarks.kernel_report`)."""
