"""`python -m research.bench_compare`: the command; its code is research.tools.bench_compare."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.bench_compare", run_name="__main__", alter_sys=True)
