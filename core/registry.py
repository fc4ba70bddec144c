"""A small name -> record registry (methods, model families): a name is registered once, an
unknown name is an error that lists the known ones."""
from __future__ import annotations

from typing import Generic, TypeVar

Record = TypeVar("Record")


class Registry(Generic[Record]):
    def __init__(self, what: str, unknown: type[Exception] = KeyError):
        self.what = what  # "method", "model family": how messages name a record
        self.unknown = unknown  # the error an unknown name raises
        self._records: dict[str, Record] = {}

    def add(self, name: str, record: Record) -> Record:
        """Register `record` as `name`; the same record again is harmless, another is refused."""
        if name in self._records and self._records[name] != record:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._records[name] = record
        return record

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def get(self, name: str) -> Record:
        try:
            return self._records[name]
        except KeyError:
            raise self.unknown(f"unknown {self.what} {name!r}; known: "
                               f"{', '.join(self._records)}") from None

    def find(self, name: str) -> Record | None:
        return self._records.get(name)

    def names(self) -> list[str]:
        return list(self._records)

    def records(self) -> list[Record]:
        return list(self._records.values())
