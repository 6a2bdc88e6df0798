"""The data formats the ``recpeft`` command reads (see :mod:`.sources`), as plain constants so
that the command line can list them without importing pandas or torch."""

FORMATS = ("auto", "shop", "interactions", "movielens", "criteo")
#: MovieLens user attributes that can name segments (``--segment-by``)
MOVIELENS_SEGMENT_ATTRIBUTES = ("gender", "age", "occupation")
#: MovieLens categorical features (``--categorical``; :mod:`.movielens`), and the default set
MOVIELENS_FEATURES = ("age", "gender", "occupation", "zip_prefix", "genres", "genre")
MOVIELENS_DEFAULT_FEATURES = ("age", "gender", "occupation", "zip_prefix", "genres")
#: epoch units of a numeric time column (``--time-unit``; detected by magnitude when not given)
TIME_UNITS = ("s", "ms", "us", "ns")
