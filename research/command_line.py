"""`python -m research.command_line`: the command; its code is research.config.command_line."""
import runpy

if __name__ == "__main__":
  runpy.run_module("research.config.command_line", run_name="__main__", alter_sys=True)
