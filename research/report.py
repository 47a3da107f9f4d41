"""`python -m research.report`: the command; its code is research.tools.report."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.report", run_name="__main__", alter_sys=True)
