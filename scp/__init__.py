"""minipacs network face: the DICOM services, built on pynetdicom over :mod:`storage`."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
