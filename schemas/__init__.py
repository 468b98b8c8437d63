"""Message and record types, the Massive ticker codec, and every stream/key name."""
