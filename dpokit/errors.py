class DpokitError(ValueError):
    """Bad user input (a data file, a config, a checkpoint). Its message is one line naming where
    the problem is; recipes print it as `error: ...` instead of a traceback.

    When a setting of the raising function fixes or sidesteps the problem, it travels along:
    `fix_param` (the parameter), `fix_value` and `fix_effect`. The message then ends with
    "(skip_invalid=true skips ...)"; a caller that knows where that parameter lives for the user
    (a config path, a command-line flag) spells it so with `message_with_fix`."""

    def __init__(self, message: str, *, fix_param: str | None = None, fix_value: str = "true", fix_effect: str = ""):
        self.detail, self.fix_param, self.fix_value, self.fix_effect = message, fix_param, fix_value, fix_effect
        super().__init__(self.message_with_fix(None if fix_param is None else f"{fix_param}={fix_value}"))

    def message_with_fix(self, setting: str | None) -> str:
        """The message with its fix spelled as `setting` (e.g. "train_dataset.skip_invalid=true")."""
        if self.fix_param is None or setting is None:
            return self.detail
        return f"{self.detail} ({setting} {self.fix_effect})"


class RunInterrupted(DpokitError):
    """The run stopped at a step boundary because it was asked to (Ctrl-C, SIGTERM); `checkpoint`
    is the latest complete one (saved on the way out where possible). Exit code 130."""

    def __init__(self, step: int, checkpoint, signal_name: str):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"latest checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"stopped at step {step} ({signal_name}); {where}")
