"""BitNet b1.58 ternary LLMs from Python, on a Rust engine.

Load Hugging Face checkpoints or GGUF files (or the small embedded model), generate, chat, read
logits, convert, quantize and train. The engine works with the GIL released; one Model serves
many Python threads at once; Ctrl-C stops a generation cleanly.

    >>> import bitnet
    >>> model = bitnet.Model.load()            # the embedded default model
    >>> print(model.generate("Once upon a time", max_tokens=32).text)
"""

import os
from typing import Callable, Iterator, List, Literal, Mapping, Optional, Sequence, Union, final, overload

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "BitNetError",
    "Generation",
    "TextStream",
    "Model",
    "Tokenizer",
    "convert",
    "quantize",
    "train",
    "TrainSummary",
    "__version__",
]

_Path = Union[str, "os.PathLike[str]"]
_Prompt = Union[str, Sequence[int]]
_Stop = Union[None, str, Sequence[str]]
_StopReason = Literal["eos", "stop_string", "max_tokens", "context_full", "cancelled"]

class BitNetError(Exception):
    """Base class of the errors the BitNet engine raises: a checkpoint it cannot read, a
    generation, conversion or training run that failed. Bad arguments raise ValueError and
    missing files FileNotFoundError instead. The message is the engine's."""

@final
class Generation:
    """The result of Model.generate or Model.chat (or a TextStream's result)."""

    text: str
    """The generated text, cut before a stop string."""
    token_ids: List[int]
    """The generated token ids (an end-of-sequence id that stopped generation included)."""
    prompt_token_ids: List[int]
    stop_reason: _StopReason
    prompt_seconds: float
    decode_seconds: float
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    """Generated tokens per second after the first (which comes from the prompt's pass)."""

@final
class TextStream(Iterator[str]):
    """An iterator over a generation's text, piece by piece as tokens complete. The pieces
    join to the text the same call gives with stream=False. Closing the stream (close(), the
    end of a with block, garbage collection) or Ctrl-C while reading it stops the generation."""

    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation if it still runs and waits for it to end."""
    @property
    def result(self) -> Optional[Generation]:
        """The Generation once the stream is exhausted or closed; None before."""
    def __enter__(self) -> "TextStream": ...
    def __exit__(self, *exc: object) -> bool: ...

@final
class Tokenizer:
    """A model's tokenizer (its tokenizer.json, or its GGUF file's vocabulary)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of text; add_special_tokens adds what the tokenizer's template adds (BOS)."""
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out."""
    def token_to_id(self, token: str) -> Optional[int]: ...
    @property
    def vocab_size(self) -> int: ...

@final
class Model:
    """A BitNet b1.58 model loaded for inference on the CPU. Create it with Model.load()."""

    @staticmethod
    def load(
        path: Optional[_Path] = None,
        device: str = "cpu",
        threads: Optional[int] = None,
        lm_head: Optional[Literal["float", "int8", "int6"]] = None,
    ) -> "Model":
        """Loads a Hugging Face checkpoint folder or a .gguf file; path=None loads the model
        embedded in the library. threads: per call (None: every core). lm_head: "float" (as in
        the checkpoint, exact), "int8" or "int6" (faster, approximate logits).

        Raises FileNotFoundError, ValueError (bad argument) or BitNetError (unreadable checkpoint).
        """
    @overload
    def generate(
        self,
        prompt: _Prompt,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: _Stop = None,
        stream: Literal[False] = False,
    ) -> Generation: ...
    @overload
    def generate(
        self,
        prompt: _Prompt,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: _Stop = None,
        stream: Literal[True],
    ) -> TextStream:
        """Generates after a prompt (text, or token ids). temperature=0 is greedy. Ends at an
        end-of-sequence token, a stop string (the text is cut before it) or max_tokens."""
    @overload
    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: _Stop = None,
        stream: Literal[False] = False,
    ) -> Generation: ...
    @overload
    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: _Stop = None,
        stream: Literal[True],
    ) -> TextStream:
        """Replies to [{"role": ..., "content": ...}, ...] rendered with the checkpoint's chat
        template (a plain "Role: content" format when it has none). Also stops at the template's
        end-of-turn tokens."""
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: Literal[True] = True,
    ) -> List[int]: ...
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: Literal[False],
    ) -> str:
        """The prompt of a conversation, as transformers' apply_chat_template."""
    def logits(
        self, token_ids: _Prompt, all_positions: bool = False
    ) -> npt.NDArray[np.float32]:
        """float32 logits: of the last position, shape (vocab_size,), or with all_positions of
        every position, shape (len(token_ids), vocab_size). Bit for bit `bitnet logits`."""
    def embed(self, texts: Union[str, Sequence[str]]) -> npt.NDArray[np.float32]:
        """float32 embeddings, shape (len(texts), hidden_size), each row L2-normalized: the
        last-token pooling of BitNet-embedding models. Bit for bit `bitnet embed`."""
    @property
    def tokenizer(self) -> Optional[Tokenizer]: ...
    @property
    def chat_template(self) -> Optional[str]:
        """The checkpoint's chat template (Jinja source); None when chat() uses the fallback."""
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_ids(self) -> List[int]: ...
    @property
    def source(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def lm_head(self) -> Literal["float", "int8", "int6"]: ...

@final
class TrainSummary:
    steps_done: int
    stopped_early: bool
    final_loss: float
    val_loss: Optional[float]
    parameters: int
    tokens_per_s: float
    out: "os.PathLike[str]"

def convert(
    src: _Path,
    dst: _Path,
    type: Literal["tq2_0", "tq1_0", "q2_0", "q1_0", "pq2_0", "ptq1_0", "i2_s", "f16"] = "tq2_0",
    lm_head_type: Literal["f16", "q8_0", "q6_k", "q4_k"] = "f16",
) -> None:
    """Converts a Hugging Face BitNet checkpoint folder to a GGUF file (as `bitnet convert`)."""

def quantize(
    src: _Path,
    dst: _Path,
    type: Literal["tq2_0", "tq1_0", "q2_0", "q1_0", "pq2_0", "ptq1_0", "i2_s", "f16", "bf16", "q8_0", "q6_k", "q4_k"],
) -> None:
    """Re-encodes a GGUF file as another type (as `bitnet quantize`): the ternary types re-encode
    the ternary projections (exact codes); f16, bf16, q8_0, q6_k and q4_k every weight matrix."""

def train(
    data: _Path,
    out: _Path,
    *,
    preset: Literal["tiny", "small", "medium"] = "tiny",
    steps: Optional[int] = None,
    callback: Optional[Callable[[int, float], Optional[bool]]] = None,
    seed: int = 0,
    threads: Optional[int] = None,
    resume: bool = False,
    fp: bool = False,
    arch: Optional[Literal["bitnet", "llama158"]] = None,
    batch: Optional[int] = None,
    seq: Optional[int] = None,
    lr: Optional[float] = None,
    vocab: Optional[int] = None,
    tokenizer: Optional[_Path] = None,
    hidden: Optional[int] = None,
    layers: Optional[int] = None,
    save_every: Optional[int] = None,
    eval_every: Optional[int] = None,
    samples: int = 0,
    quiet: bool = True,
) -> TrainSummary:
    """Trains a BitNet b1.58 model on a text file (as `bitnet train`); the model lands in out,
    loadable with Model.load(out). callback(step, loss) runs after every step; returning False
    stops the run (with a checkpoint). Ctrl-C stops it after the current step."""
