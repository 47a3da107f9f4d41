"""Reading a run's configuration and checking it before anything runs.

  command_line.py       research.main's command line: parsed (every flag mistake one
                        UserError) and built (main_command, for studies and benchmarks)
  config_schema.py      every config field: kind, accepted values, default, meaning
  config_validation.py  a config checked before anything runs; the run takes its result
  workdir_config.py     the config a workdir was started with: read, repair, compare
"""
