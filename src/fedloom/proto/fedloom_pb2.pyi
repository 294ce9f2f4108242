from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("frame_id", "total_size", "data", "last", "signature")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    total_size: int
    data: bytes
    last: bool
    signature: bytes
    def __init__(self, frame_id: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("client_id", "protocol_version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    protocol_version: int
    def __init__(self, client_id: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("hello", "reply", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    reply: Chunk
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., reply: _Optional[_Union[Chunk, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "heartbeat_seconds", "sign_replies")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGN_REPLIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    heartbeat_seconds: float
    sign_replies: bool
    def __init__(self, protocol_version: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ..., sign_replies: _Optional[bool] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason", "fatal", "come_back")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    COME_BACK_FIELD_NUMBER: _ClassVar[int]
    reason: str
    fatal: bool
    come_back: bool
    def __init__(self, reason: _Optional[str] = ..., fatal: _Optional[bool] = ..., come_back: _Optional[bool] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Forget(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "task", "notice", "goodbye", "blob", "forget")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: Chunk
    notice: Notice
    goodbye: Goodbye
    blob: Chunk
    forget: Forget
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[Chunk, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., blob: _Optional[_Union[Chunk, _Mapping]] = ..., forget: _Optional[_Union[Forget, _Mapping]] = ...) -> None: ...
