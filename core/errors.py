"""The one exception type users see, and how it names where the problem is."""


class PerceptcoreError(Exception):
    """A problem with the user's input or environment, stated so it can be fixed.

    `where` names the place (``spec.yaml: observers[2].predictions``, a file, a
    column, a plugin); the CLI prints ``where: message`` and exits with code 1.
    """

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, outer: str) -> "PerceptcoreError":
        """The same error, located inside `outer` (e.g. the spec file's name)."""
        where = f"{outer}: {self.where}" if self.where else outer
        return PerceptcoreError(self.message, where)
