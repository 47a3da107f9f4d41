"""`python -m research.benchmark`: the command; its code is research.tools.benchmark."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.benchmark", run_name="__main__", alter_sys=True)
