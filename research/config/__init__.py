"""Reading a run's configuration and checking it before anything runs.

  command_line.py   flag parsing for `research.main`: every flag mistake becomes one UserError
  config_schema.py  every config field: kind, accepted values, default, meaning
  config_checks.py  validation and resolution of a config before anything runs
"""
