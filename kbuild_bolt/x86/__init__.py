"""The instruction set: decoding (iced-x86, in bulk into numpy arrays), encoding and
instruction patterns. This layer sees bytes and addresses only."""
