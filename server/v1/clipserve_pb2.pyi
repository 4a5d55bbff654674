from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]
    PRECISION_INT4: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]

class Tower(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOWER_IMAGE: _ClassVar[Tower]
    TOWER_TEXT: _ClassVar[Tower]

class EmbeddingFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_FORMAT_FLOAT32: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_FLOAT16: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_INT8: _ClassVar[EmbeddingFormat]
    EMBEDDING_FORMAT_UBINARY: _ClassVar[EmbeddingFormat]
PRECISION_FP32: Precision
PRECISION_FP16: Precision
PRECISION_INT8: Precision
PRECISION_INT4: Precision
PRECISION_BF16: Precision
TOWER_IMAGE: Tower
TOWER_TEXT: Tower
EMBEDDING_FORMAT_FLOAT32: EmbeddingFormat
EMBEDDING_FORMAT_FLOAT16: EmbeddingFormat
EMBEDDING_FORMAT_INT8: EmbeddingFormat
EMBEDDING_FORMAT_UBINARY: EmbeddingFormat

class Endpoint(_message.Message):
    __slots__ = ("name", "scale", "precision", "tower", "embed_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    TOWER_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: str
    precision: Precision
    tower: Tower
    embed_dim: int
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[str] = ..., precision: _Optional[_Union[Precision, str]] = ..., tower: _Optional[_Union[Tower, str]] = ..., embed_dim: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "packed")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    packed: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., packed: _Optional[bytes] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images", "format", "pack_float32")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PACK_FLOAT32_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    format: EmbeddingFormat
    pack_float32: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., pack_float32: _Optional[bool] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("endpoint", "embeddings", "request_id", "format", "embeddings_f32")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_F32_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    request_id: str
    format: EmbeddingFormat
    embeddings_f32: bytes
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., request_id: _Optional[str] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., embeddings_f32: _Optional[bytes] = ...) -> None: ...

class EmbedTextsRequest(_message.Message):
    __slots__ = ("texts", "format", "pack_float32")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PACK_FLOAT32_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    format: EmbeddingFormat
    pack_float32: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., pack_float32: _Optional[bool] = ...) -> None: ...

class TextEmbedding(_message.Message):
    __slots__ = ("values", "truncated", "packed", "tokens")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    truncated: bool
    packed: bytes
    tokens: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., truncated: _Optional[bool] = ..., packed: _Optional[bytes] = ..., tokens: _Optional[int] = ...) -> None: ...

class EmbedTextsResponse(_message.Message):
    __slots__ = ("endpoint", "embeddings", "format", "embeddings_f32")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_F32_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    embeddings: _containers.RepeatedCompositeFieldContainer[TextEmbedding]
    format: EmbeddingFormat
    embeddings_f32: bytes
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., embeddings: _Optional[_Iterable[_Union[TextEmbedding, _Mapping]]] = ..., format: _Optional[_Union[EmbeddingFormat, str]] = ..., embeddings_f32: _Optional[bytes] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("id", "image", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    text: str
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("id", "endpoint", "embedding", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    endpoint: Endpoint
    embedding: TextEmbedding
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., embedding: _Optional[_Union[TextEmbedding, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "labels", "prompt_templates")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    labels: _containers.RepeatedScalarFieldContainer[str]
    prompt_templates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., labels: _Optional[_Iterable[str]] = ..., prompt_templates: _Optional[_Iterable[str]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("probabilities", "top_index", "top_label", "confidence", "ood_score", "out_of_distribution")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top_index: int
    top_label: str
    confidence: float
    ood_score: float
    out_of_distribution: bool
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., top_index: _Optional[int] = ..., top_label: _Optional[str] = ..., confidence: _Optional[float] = ..., ood_score: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("endpoint", "text_endpoint", "labels", "results", "temperature", "ood_threshold", "request_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OOD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    text_endpoint: Endpoint
    labels: _containers.RepeatedScalarFieldContainer[str]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    temperature: float
    ood_threshold: float
    request_id: str
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., text_endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., temperature: _Optional[float] = ..., ood_threshold: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("endpoint", "ready", "image_size", "context_length", "max_batch_size", "source", "description", "quantization", "temperature", "ood_threshold", "labels", "routing_weight", "int8_ranges")
    class QuantizationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OOD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INT8_RANGES_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    ready: bool
    image_size: int
    context_length: int
    max_batch_size: int
    source: str
    description: str
    quantization: _containers.ScalarMap[str, str]
    temperature: float
    ood_threshold: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    routing_weight: float
    int8_ranges: Int8Ranges
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., ready: _Optional[bool] = ..., image_size: _Optional[int] = ..., context_length: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., source: _Optional[str] = ..., description: _Optional[str] = ..., quantization: _Optional[_Mapping[str, str]] = ..., temperature: _Optional[float] = ..., ood_threshold: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ..., routing_weight: _Optional[float] = ..., int8_ranges: _Optional[_Union[Int8Ranges, _Mapping]] = ...) -> None: ...

class Int8Ranges(_message.Message):
    __slots__ = ("lo", "hi")
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    lo: _containers.RepeatedScalarFieldContainer[float]
    hi: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, lo: _Optional[_Iterable[float]] = ..., hi: _Optional[_Iterable[float]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("endpoints", "scales", "precisions")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointInfo]
    scales: _containers.RepeatedScalarFieldContainer[str]
    precisions: _containers.RepeatedScalarFieldContainer[Precision]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EndpointInfo, _Mapping]]] = ..., scales: _Optional[_Iterable[str]] = ..., precisions: _Optional[_Iterable[_Union[Precision, str]]] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("index", "true_label")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TRUE_LABEL_FIELD_NUMBER: _ClassVar[int]
    index: int
    true_label: str
    def __init__(self, index: _Optional[int] = ..., true_label: _Optional[str] = ...) -> None: ...

class ReportOutcomeRequest(_message.Message):
    __slots__ = ("request_id", "outcomes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, request_id: _Optional[str] = ..., outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...

class ReportOutcomeResponse(_message.Message):
    __slots__ = ("accepted", "endpoint")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    endpoint: Endpoint
    def __init__(self, accepted: _Optional[int] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...
