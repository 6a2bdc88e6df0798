"""Helpers any layer may use: atomic file writes (``atomic``) and shared argument validators
(``validation``). Imports nothing from the rest of recpeft.
"""
