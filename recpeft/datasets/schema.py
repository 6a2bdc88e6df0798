"""Schema: which column of an interaction table plays which role.

An interaction table has one row per impression (or rating, or purchase). The roles:

- ``user``, ``item``: id columns (ints or strings), each an embedding table's key. Either may be
  ``None`` for click logs that have only anonymous categorical features (Criteo).
- ``categorical``: further sparse features (category, brand, C1..C26), one id per row each, or
  several for those also named in ``bags``.
- ``bags``: the categorical columns whose cells are bags of ids (a movie's genres): the ids'
  text joined by ``BAG_SEPARATOR`` (``"Action|Comedy"``; empty pieces are dropped, so ``""`` is
  the empty bag). Such a feature's table pools the rows of all of a row's ids (a multi-hot
  feature: several ids per row in the ``KeyedJaggedTensor``).
- ``dense``: numeric features, one float per row each.
- ``label``: the target, 0/1 (clicked, bought, rated ≥ 4); ``None`` for unlabelled scoring data.
- ``segment``: the column whose values name the segment (market, cohort, tenant) a row belongs
  to, i.e. which adapter serves it; ``None`` when there is one population.
- ``timestamp``: when the interaction happened, for time-ordered splits; ``None`` if unknown.

Every sparse feature becomes one embedding table; ``sparse_features`` lists them in table order
(user, item, then ``categorical``), which is also the order of a ``KeyedJaggedTensor``'s keys.

Example::

    schema = Schema(segment="market", timestamp="day", categorical=("category",), dense=("price",))
    schema.sparse_features   # ('user', 'item', 'category')
    Schema.from_dict(schema.to_dict()) == schema   # True
    Schema(categorical=("genres",), bags=("genres",))   # cells such as "Action|Comedy"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SINGLE_ROLES = ("user", "item", "label", "segment", "timestamp")
_MULTI_ROLES = ("categorical", "dense")
#: what joins the ids of one bag cell (see ``bags``)
BAG_SEPARATOR = "|"


@dataclass(frozen=True)
class Schema:
    """Column roles of an interaction table (see the module docstring).

    Args:
        user, item: id columns, or ``None``.
        label: 0/1 target column, or ``None``.
        segment: segment-name column, or ``None``.
        timestamp: time column (datetimes, date strings or epoch seconds), or ``None``.
        categorical: extra sparse id/string columns.
        dense: numeric columns.
        bags: the categorical columns whose cells are bags of ids (``"A|B"``).

    Raises ValueError when a name is empty or not a string, when one column has two roles, when a
    bag is not a categorical column, or when there is no sparse feature at all.
    """

    user: str | None = "user"
    item: str | None = "item"
    label: str | None = "label"
    segment: str | None = "segment"
    timestamp: str | None = "timestamp"
    categorical: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    bags: tuple[str, ...] = ()

    def __post_init__(self):
        for role in (*_MULTI_ROLES, "bags"):
            value = getattr(self, role)
            if isinstance(value, str):
                raise ValueError(
                    f"Schema.{role} must be a sequence of column names, got the string {value!r}; write ({value!r},)"
                )
            object.__setattr__(self, role, tuple(value))
        seen: dict[str, str] = {}
        for role, column in self._role_columns():
            if not isinstance(column, str) or not column:
                raise ValueError(f"Schema.{role} must be a non-empty column name, got {column!r}")
            if column in seen:
                raise ValueError(f"Schema: column {column!r} has two roles, {seen[column]} and {role}")
            seen[column] = role
        if not self.sparse_features:
            raise ValueError("Schema has no sparse feature: give user, item or categorical columns")
        stray = [c for c in self.bags if c not in self.categorical]
        if stray or len(set(self.bags)) != len(self.bags):
            raise ValueError(
                f"Schema.bags must name categorical columns, each once; got {list(self.bags)} "
                f"with categorical {list(self.categorical)}"
            )

    def _role_columns(self) -> list[tuple[str, Any]]:
        """(role, column) for every role that is set, multi-column roles as ``categorical[0]`` etc."""
        pairs = [(role, getattr(self, role)) for role in _SINGLE_ROLES if getattr(self, role) is not None]
        for role in _MULTI_ROLES:
            pairs += [(f"{role}[{i}]", column) for i, column in enumerate(getattr(self, role))]
        return pairs

    @property
    def sparse_features(self) -> tuple[str, ...]:
        """The embedding-table features in key order: user, item (those that are set), categorical."""
        return tuple(c for c in (self.user, self.item) if c is not None) + self.categorical

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the schema names, each once."""
        return tuple(column for _, column in self._role_columns())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: role → column name (``None`` for unset roles), lists for multi roles;
        ``bags`` only when set, so a schema without bags writes what it wrote before bags existed."""
        out: dict[str, Any] = {role: getattr(self, role) for role in _SINGLE_ROLES}
        out.update({role: list(getattr(self, role)) for role in _MULTI_ROLES})
        if self.bags:
            out["bags"] = list(self.bags)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schema:
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        known = (*_SINGLE_ROLES, *_MULTI_ROLES, "bags")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"Schema.from_dict: unknown keys {unknown}; known: {list(known)}")
        return cls(**{k: (v if k in _SINGLE_ROLES else tuple(v)) for k, v in data.items()})
