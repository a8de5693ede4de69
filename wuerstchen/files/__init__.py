"""Model files: key layouts, the table of model kinds, detection by content, loading on meta,
walking a models folder, the model manager and tiny checkpoints for tests.
"""
