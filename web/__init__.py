"""minipacs web: the HTTP face (PS3.18 DICOMweb: QIDO-RS, WADO-RS, STOW-RS; the OHIF viewer).

An ASGI application (Starlette) served by uvicorn beside the DICOM listener. It knows
``storage``'s façade only, never ``scp`` or pynetdicom.
"""

from .admin import Done, Operations, Peer
from .app import create_app
from .config import WebConfig
from .server import WebListenError, WebServer

__all__ = ["Done", "Operations", "Peer", "WebConfig", "WebListenError", "WebServer", "create_app"]
