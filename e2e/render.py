#!/usr/bin/env python3
"""Fills ${VAR}s in an e2e manifest template: render.py FILE VAR=VALUE...
Fails on a variable without a value."""
import string
import sys

text = open(sys.argv[1]).read()
values = dict(a.split("=", 1) for a in sys.argv[2:])
sys.stdout.write(string.Template(text).substitute(values))
