"""`python -m research.check_accelerator`: the command; its code is research.tools.check_accelerator."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.tools.check_accelerator", run_name="__main__", alter_sys=True)
