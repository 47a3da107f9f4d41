"""`python -m research.bench_input`: the command; its code is research.tools.bench_input."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.bench_input", run_name="__main__", alter_sys=True)
