"""DICOM in: decoding, the chest policy, pictures, and the DICOM codes and UIDs.

``decode`` reads pixel data with pydicom's handlers; ``ingest`` applies the chest policy and
turns an accepted object (or a PNG/JPEG, through ``pictures``) into the display-ready
[0, 1] array every later stage takes; ``codes`` holds every DICOM code, UID and status the
project uses, ``uids`` makes new UIDs. May import the shared top-level modules
(``errors``, ``settings``, ``results``, ``logs``) and nothing else of the library.
"""
