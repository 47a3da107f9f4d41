"""`python -m research.predict`: the command; its code is research.tools.predict."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.predict", run_name="__main__", alter_sys=True)
