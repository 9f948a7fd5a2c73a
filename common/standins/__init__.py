"""Offline stand-ins, each named by the paper deviation it serves: toy worlds, drawings, rule
judges."""
