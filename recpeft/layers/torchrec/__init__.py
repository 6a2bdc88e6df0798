"""LoRA wrappers for torchrec's embedding collections (imported only where torchrec is installed).

:class:`LoraEmbeddingBagCollection` wraps ``EmbeddingBagCollection`` (KJT → KeyedTensor),
:class:`LoraEmbeddingCollection` wraps ``EmbeddingCollection`` (KJT → Dict[str, JaggedTensor]).
Their tables are addressed as ``"<module>.<table>"``; see :mod:`.collection` for the math.
Part of ``recpeft.layers``: may import its siblings there, ``recpeft.kernels`` and ``recpeft.utils``.
"""

from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from .collection import LoraCollectionLayer
from .embedding_bag_collection import LoraEmbeddingBagCollection
from .embedding_collection import LoraEmbeddingCollection

#: torchrec module type → its LoRA wrapper (registered by :mod:`recpeft.layers`)
TORCHREC_WRAPPERS = {
    EmbeddingBagCollection: LoraEmbeddingBagCollection,
    EmbeddingCollection: LoraEmbeddingCollection,
}

__all__ = ["LoraCollectionLayer", "LoraEmbeddingBagCollection", "LoraEmbeddingCollection", "TORCHREC_WRAPPERS"]
