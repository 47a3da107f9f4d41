"""`python -m research.prepare_data`: the command; its code is research.data.prepare_data."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.data.prepare_data", run_name="__main__", alter_sys=True)
