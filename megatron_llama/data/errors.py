"""The one base class of bad-data errors, so entry points can tell bad input from a bug.

Every error that data/ raises about its input (a corpus line, a compressed file cut short, a .bin/.idx pair, an
SFT record, an index cache, token ids the model cannot embed) is a DataError whose message names the file (and
line, prefix or flag) and says what to change. `python -m megatron_llama.pretrain` prints it as one line and
exits with its bad-data status (pretrain.EXIT_BAD_DATA); the tools print it and exit with 1.
"""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what to change."""
