"""The error a user fixes, on the package's lowest floor.

Every layer that checks what a user gave (configs, data sources and their
files, evaluators, the workdir) raises `ConfigError` with one line saying
what to change; the CLI prints that line and exits with status 2. It lives
here, below `config_lib` and `data`, so that the config module can import
the parts it is made of and no part imports the config module.
"""


class ConfigError(ValueError):
  """A config, or data or workdir it names, that cannot run; says what to fix."""
