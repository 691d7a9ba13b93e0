"""MindIR export of a decoder behind the generation interface, and running the exported files
with MindSpore Lite (or mindspore.load + GraphCell where Lite is not installed):
export.py (the graph wrappers), graphs.py (what a file declares), decoder_graphs.py (where an
export writes the full/incremental graphs and the embeddings, the checks before loading them),
runtime.py (running them behind generate()'s CausalLM interface)."""
