"""Errors a user can act on. The CLI prints them without a traceback and exits with status 2."""


class OdysseyError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(OdysseyError, ValueError):
    """A config field is unknown or has a bad value; the message names the field."""


class SchemaError(OdysseyError, ValueError):
    """A data file does not match the corpus schema; the message names file, row and column."""
