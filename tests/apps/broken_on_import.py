"""A module that cannot be imported (``muxgate check`` reports where)."""

raise RuntimeError("this module is broken at import (on purpose)")
