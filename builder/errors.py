"""The one error type for bad input. The CLI turns it into a message and exit code 2."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input, located as precisely as the input allows: file, row (0-based), field.

    >>> str(DataError("empty text", file="a.parquet", row=3, field="question"))
    'a.parquet: row 3: field question: empty text'
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.message, self.file, self.row, self.field = message, file, row, field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(str(self.file))
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field}")
        return ": ".join(parts + [self.message])

    def located(self, *, file: str | None = None, row: int | None = None) -> "DataError":
        """The same error with a file or row filled in where it was missing."""
        return DataError(
            self.message,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            field=self.field,
        )
