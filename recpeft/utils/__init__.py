"""Helpers any layer may use: atomic file writes (``atomic``), shared argument validators
(``validation``), tensor byte counts (``tensor_bytes``), the resident-memory probe
(``memory_probe``), the device rule (``devices``) and lazy package exports (``lazy``).
Imports nothing from the rest of recpeft.
"""
