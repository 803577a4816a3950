"""megalign's commands: thin shells over the library (which never imports them).

``python -m megalign.cli.<name>`` and the ``megalign-<name>`` console scripts are the same.
"""
