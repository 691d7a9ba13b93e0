"""MindIR export of a decoder behind the generation interface, and running the exported files
with MindSpore Lite (or mindspore.load + GraphCell where Lite is not installed)."""
