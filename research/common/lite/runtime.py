"""Running exported MindIR files: MindSpore Lite where it is installed (Ascend hosts), else
`mindspore.load` + `nn.GraphCell`, which runs the same files exactly; and `GraphCausalLM`, the
exported prefill / decode graphs behind generate()'s `CausalLM` interface, so the graphs answer
through the same generation loop (limits, stops, sampling) as the in-graph model."""
import time

import numpy as np

from research.common.errors import UserInputError
from research.common.runtime import device_target

RUNTIMES = ("auto", "lite", "mindspore")


class GraphCellRuntime:
    """`mindspore.load` + `nn.GraphCell`: the exported graph as MindSpore compiled it."""

    name = "MindSpore (mindspore.load + nn.GraphCell)"

    @staticmethod
    def load(path):
        import mindspore as ms
        from mindspore import Tensor, nn

        try:
            cell = nn.GraphCell(ms.load(path))
        except (RuntimeError, ValueError) as err:
            raise UserInputError(f"MindSpore cannot load {path}: {err}") from err

        def run(*values):
            outputs = cell(*[Tensor(v) if isinstance(v, np.ndarray) else v for v in values])
            return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

        return run

    @staticmethod
    def to_numpy(value):
        return value.asnumpy()


class LiteRuntime:
    """MindSpore Lite: each file is built with the GE options of a config file."""

    name = "MindSpore Lite"

    def __init__(self, mslite, ge_config, device_id):
        self.mslite = mslite
        self.ge_config = ge_config
        self.context = mslite.Context()
        if device_target() == "Ascend":
            self.context.target = ["ascend"]
            self.context.ascend.device_id = device_id
        else:
            self.context.target = ["cpu"]

    def load(self, path):
        model = self.mslite.Model()
        try:
            model.build_from_file(path, self.mslite.ModelType.MINDIR, self.context, self.ge_config)
        except (RuntimeError, ValueError) as err:
            raise UserInputError(f"MindSpore Lite cannot build {path} with {self.ge_config}: {err}") from err
        slots = model.get_inputs()

        def run(*values):
            tensors = []
            for slot, value in zip(slots, values):
                if isinstance(value, np.ndarray):  # else: an output tensor of an earlier call
                    slot.set_data_from_numpy(np.ascontiguousarray(value))
                    value = slot
                tensors.append(value)
            return tuple(model.predict(tensors))

        return run

    @staticmethod
    def to_numpy(value):
        return value.get_data_to_numpy()


def select_runtime(choice, ge_config, device_id):
    """(runtime, a line saying which one runs and why); choice is one of RUNTIMES."""
    if choice in ("auto", "lite"):
        try:
            import mindspore_lite as mslite
        except ImportError:
            if choice == "lite":
                raise UserInputError("--runtime lite: mindspore_lite is not installed (it ships for "
                                     "Ascend hosts); use --runtime auto or mindspore") from None
        else:
            return LiteRuntime(mslite, ge_config, device_id), \
                f"runtime: MindSpore Lite {getattr(mslite, '__version__', '')} with GE config {ge_config}"
    reason = "requested" if choice == "mindspore" else "mindspore_lite is not installed"
    return GraphCellRuntime(), (f"runtime: {GraphCellRuntime.name} ({reason}; the GE options of "
                                f"{ge_config} apply to MindSpore Lite only)")


class Graph:
    """One exported file: its inputs as the file declares them, and a way to run it.

    Numpy inputs are cast to the declared dtypes; outputs stay runtime tensors (the KV cache goes
    back in without a copy), `numpy()` converts one.
    """

    def __init__(self, kind, path, inputs):
        """`inputs`: {name: GraphInput} as research.common.lite.graphs.check_graph_kind returns them."""
        self.kind, self.path = kind, path
        self.inputs = inputs
        self.runtime = None
        self._run = None

    def __getitem__(self, name):
        return self.inputs[name]

    def load(self, runtime):
        self.runtime = runtime
        self._run = runtime.load(self.path)

    def __call__(self, *values):
        cast = []
        for spec, value in zip(self.inputs.values(), values):
            if isinstance(value, np.ndarray) or np.isscalar(value):
                value = np.asarray(value, dtype=spec.dtype)
                if value.shape != spec.shape:
                    raise ValueError(f"{self.kind} graph input {spec.name}: got shape "
                                     f"{value.shape}, the file has {spec.shape}")
            cast.append(value)
        return self._run(*cast)

    def numpy(self, value):
        return self.runtime.to_numpy(value)


class GraphCausalLM:
    """The exported decoder graphs behind generate()'s CausalLM interface: the prefill ("full")
    graph for the prompt (padded on the right to its static length: the padded slots are
    overwritten by the decode steps before they are attended) and, when given, the decode
    ("inc") graph per token, which takes the KV cache in and gives the updated one back.
    Token embeddings are a numpy gather from `embedding_table`; `generation_inputs` is the
    model's own (positions and mask). The graphs' batch size is fixed: fewer rows are run with
    the last row repeated to fill it (a copy of that row's work, dropped from the outputs)."""

    def __init__(self, prefill, decode, embedding_table, generation_inputs):
        self.prefill_graph, self.decode_graph = prefill, decode
        self.embedding_table = embedding_table
        self.generation_inputs = generation_inputs
        self.batch_size, self.seq_length, _ = prefill["input_embeds"].shape
        self.key_cache = self.value_cache = None
        self.prefill_seconds = None  # the first pass over the prompt (timings)

    def token_embeddings(self, input_ids):
        return self.embedding_table[input_ids]

    def start_cache(self, batch_size, min_length):
        if self.decode_graph is None:
            raise UserInputError("no decode (incremental) graph was given: generate with use_past False")
        self._check_rows(batch_size)
        return self.seq_length

    def _check_rows(self, rows):
        if rows > self.batch_size:
            raise UserInputError(f"{rows} rows in one batch but the graphs were exported with batch_size "
                                 f"{self.batch_size}: run at most {self.batch_size} at a time, or re-export "
                                 f"with --batch_size {rows}")

    def _fill_rows(self, array):
        """`array` [rows, ...] with its last row repeated up to the graphs' batch size."""
        rows = array.shape[0]
        self._check_rows(rows)
        if rows == self.batch_size:
            return array
        return np.concatenate([array, np.repeat(array[-1:], self.batch_size - rows, axis=0)])

    def _run_prefill(self, input_ids, position_ids, attention_mask, logits_index, inputs_embeds):
        start = time.perf_counter()
        embeds = self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        rows, pad = embeds.shape[0], self.seq_length - embeds.shape[1]
        outputs = self.prefill_graph(
            self._fill_rows(np.pad(embeds, ((0, 0), (0, pad), (0, 0)))),
            self._fill_rows(np.pad(position_ids, [(0, 0)] * (position_ids.ndim - 1) + [(0, pad)])),
            self._fill_rows(np.pad(attention_mask, ((0, 0), (0, 0), (0, pad), (0, 0)))),
            self._fill_rows(np.asarray(logits_index)))
        logits = self.prefill_graph.numpy(outputs[0])[:rows]
        if self.prefill_seconds is None:
            self.prefill_seconds = time.perf_counter() - start
        return logits, outputs[1], outputs[2]

    def prefill(self, *, input_ids, position_ids, attention_mask, logits_index, inputs_embeds=None,
                argmax=None, cache_index=0):
        if cache_index:
            raise UserInputError("the exported prefill graph writes the KV cache from slot 0 only: a "
                                 "conversation cannot continue on it (re-encode the history instead)")
        logits, self.key_cache, self.value_cache = self._run_prefill(
            input_ids, position_ids, attention_mask, logits_index, inputs_embeds)
        return logits if argmax is None else argmax.of(logits)  # the graphs give logits

    def decode(self, *, input_ids, position_ids, attention_mask, cache_index, argmax=None):
        logits, self.key_cache, self.value_cache = self.decode_graph(
            self._fill_rows(input_ids), self._fill_rows(position_ids), self._fill_rows(attention_mask),
            self.key_cache, self.value_cache, cache_index)
        logits = self.decode_graph.numpy(logits).reshape(self.batch_size, -1)[:input_ids.shape[0]]
        return logits if argmax is None else argmax.of(logits)

    def forward(self, *, input_ids, position_ids, attention_mask, logits_index, inputs_embeds=None):
        return self._run_prefill(input_ids, position_ids, attention_mask, logits_index, inputs_embeds)[0]
