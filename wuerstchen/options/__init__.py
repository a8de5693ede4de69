"""The options a generate request takes, checked before any model loads: one definition for the
``generate`` command and for every line of a batch file.
"""
