class DpokitError(ValueError):
    """Bad user input (a data file, a config, a checkpoint). Its message is one line naming where
    the problem is; recipes print it as `error: ...` instead of a traceback."""
